//! Compiles `quckchat/**/*.proto` with tonic-build and a vendored `protoc`, so a
//! fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads the compiler's path from PROTOC.
    std::env::set_var("PROTOC", protoc);
    let protos = [
        "quckchat/bus/v1/bus.proto",
        "quckchat/chat/v1/chat.proto",
        "quckchat/presence/v1/presence.proto",
        "quckchat/signaling/v1/signaling.proto",
        "quckchat/huddle/v1/huddle.proto",
        "quckchat/push/v1/push.proto",
    ];
    tonic_prost_build::configure().compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
