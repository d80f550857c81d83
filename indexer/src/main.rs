//! simq-indexer: builds, publishes and rolls out index generations (see `--help`).

use clap::{Parser, Subcommand};

/// Builds index generations (dg) of a query corpus and rolls them out.
///
/// build: corpus -> embeddings -> k-means shards -> LMDB files + manifest.json.
/// publish, rollout, rollback, status: see their own --help.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Build a dg from a corpus file.
    Build,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!("{:?} is not built yet (issue 4)", args.command)
}
