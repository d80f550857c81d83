//! Generates the gRPC contract code from proto/shard.proto.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/shard.proto");
    tonic_prost_build::compile_protos("proto/shard.proto")?;
    Ok(())
}
