# syntax=docker/dockerfile:1
# One image with every QuckChat binary; k8s/ runs each service as its own
# Deployment (command: /usr/local/bin/<binary>). The default command is the
# all-in-one server. scripts/check-k8s.sh checks that this file builds and
# copies every binary of the workspace and runs as non-root on a distroless
# base; there is no Docker engine in CI, so the image itself is not built there.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds, so the
# binaries are copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
    && mkdir -p /out/bin /out/data \
    && cp target/release/gateway target/release/chat-svc target/release/presence-svc \
          target/release/signaling-svc target/release/huddle-svc target/release/push-svc \
          target/release/quckchat target/release/bench /out/bin/

# glibc, libgcc and CA certificates, no shell or package manager; the
# `nonroot` variant's user is 65532, as in k8s/ (runAsUser). Same Debian
# release as the build stage, so the glibc matches.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/bin/gateway /out/bin/chat-svc /out/bin/presence-svc \
     /out/bin/signaling-svc /out/bin/huddle-svc /out/bin/push-svc \
     /out/bin/quckchat /out/bin/bench /usr/local/bin/
# The all-in-one's embedded stores (DATA_DIR); the services keep nothing on disk.
COPY --from=build --chown=65532:65532 /out/data /data
ENV DATA_DIR=/data BIND_ADDRESS=0.0.0.0
VOLUME /data
USER 65532:65532
EXPOSE 4000
CMD ["/usr/local/bin/quckchat"]
