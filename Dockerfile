# One image with every QuckChat binary; k8s/ runs each as its own Deployment.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bins \
    -p quckchat -p quckchat-gateway -p quckchat-chat -p quckchat-presence -p quckchat-signaling \
    -p quckchat-huddle -p quckchat-push

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/quckchat /src/target/release/gateway \
    /src/target/release/chat-svc /src/target/release/presence-svc \
    /src/target/release/signaling-svc /src/target/release/huddle-svc \
    /src/target/release/push-svc /usr/local/bin/
RUN mkdir /data && chown 65534 /data
ENV DATA_DIR=/data BIND_ADDRESS=0.0.0.0
VOLUME /data
USER 65534
EXPOSE 4000
CMD ["/usr/local/bin/quckchat"]
