//! simq-balancer: the public entry of simq (see `--help`).

use clap::Parser;

/// The public HTTP entry of simq: POST /v1/query {"query": "..."}.
///
/// Follows the active index generation, its centroid map and healthy instances in Consul,
/// embeds the query, asks the shards with the nearest centroids, merges and answers.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!(
        "the balancer is not built yet (issue 5); would listen on {}",
        args.listen
    )
}
