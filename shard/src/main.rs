//! simq-shard: serves one shard of one index generation (see `--help`).

use clap::Parser;

/// Serves nearest-neighbour search over one shard file of one index generation (dg).
///
/// The shard file is an LMDB environment holding an arroy index and the id -> text table.
/// At start the file's sha256 must match its content address and a self-test must pass
/// before /health reports healthy.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// The shard file (LMDB, one compact file).
    #[arg(long)]
    file: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!("the shard service is not built yet (issue 5); shard file {}", args.file.display())
}
