//! Generates the gRPC contract code from shard.proto.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=shard.proto");
    tonic_prost_build::compile_protos("shard.proto")?;
    Ok(())
}
