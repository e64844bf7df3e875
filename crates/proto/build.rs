//! Compiles `proto/caroni/v1/*.proto` with protox (pure Rust, no `protoc`
//! needed) and generates prost messages and tonic services from the result.
//! The descriptor set is also written to OUT_DIR for server reflection.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "caroni/v1/protocol.proto",
        "caroni/v1/envelope.proto",
        "caroni/v1/peer.proto",
        "caroni/v1/manager.proto",
        "caroni/v1/agent.proto",
        "caroni/v1/node.proto",
        "caroni/v1/files.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("caroni_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
