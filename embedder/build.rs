//! Generates the gRPC contract code from proto/embedder.proto.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/embedder.proto");
    tonic_prost_build::compile_protos("proto/embedder.proto")?;
    Ok(())
}
