//! Round trips of gRPC calls to a running shard or embedder, one call at a time on a
//! one-thread runtime, as the balancer makes them. `Info` does no work, so its round trip
//! is what a hop costs; `--idle-us` leaves the service idle between calls, as it is between
//! the stages of a query, which on a virtual machine whose idle cores halt costs far more
//! than back-to-back calls (BENCHMARKS.md, "Where an unloaded query's time goes").
//! `embed` sends one text per call, to set beside the embedder's own inference metric.
//!
//! `cargo run --release -p simq-balancer --example grpc_rtt -- --kind shard --addr http://127.0.0.1:PORT --idle-us 5000`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use simq_embedder::proto::{
    embedder_client::EmbedderClient, EmbedRequest, InfoRequest as EmbedderInfo,
};
use simq_shard_proto::{shard_client::ShardClient, InfoRequest as ShardInfo};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    /// Shard `Info`.
    Shard,
    /// Embedder `Info`.
    Embedder,
    /// Embedder `Embed` of one text per call.
    Embed,
}

#[derive(Parser)]
struct Args {
    #[arg(long, value_enum)]
    kind: Kind,
    /// The service's gRPC address, e.g. http://127.0.0.1:7101.
    #[arg(long)]
    addr: String,
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Microseconds between calls (the client sleeps; with --spin it stays busy instead).
    #[arg(long, default_value_t = 0)]
    idle_us: u64,
    /// Spin instead of sleeping between calls, so the client's own core never idles.
    #[arg(long)]
    spin: bool,
    /// Texts for `embed`, one per line (default: one fixed question).
    #[arg(long)]
    texts: Option<PathBuf>,
    /// Print one JSON line instead of a sentence.
    #[arg(long)]
    json: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let texts: Vec<String> = match &args.texts {
        Some(path) => std::fs::read_to_string(path)?
            .lines()
            .map(str::to_string)
            .collect(),
        None => vec!["how do i reset my password".to_string()],
    };
    anyhow::ensure!(!texts.is_empty(), "--texts has no lines");
    let channel = tonic::transport::Endpoint::from_shared(args.addr.clone())?
        .connect()
        .await?;
    let idle = Duration::from_micros(args.idle_us);
    let mut times = Vec::with_capacity(args.calls);
    for call in 0..args.calls {
        if args.spin {
            let t = Instant::now();
            while t.elapsed() < idle {
                std::hint::spin_loop();
            }
        } else if !idle.is_zero() {
            std::thread::sleep(idle);
        }
        let t = Instant::now();
        match args.kind {
            Kind::Shard => {
                ShardClient::new(channel.clone()).info(ShardInfo {}).await?;
            }
            Kind::Embedder => {
                EmbedderClient::new(channel.clone())
                    .info(EmbedderInfo {})
                    .await?;
            }
            Kind::Embed => {
                let text = texts[call % texts.len()].clone();
                EmbedderClient::new(channel.clone())
                    .embed(EmbedRequest { texts: vec![text] })
                    .await?;
            }
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    anyhow::ensure!(!times.is_empty(), "--calls is 0");
    times.sort_by(f64::total_cmp);
    let at = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "kind": format!("{:?}", args.kind).to_lowercase(),
                "calls": args.calls,
                "idle_us": args.idle_us,
                "spin": args.spin,
                "mean_ms": mean,
                "p50_ms": at(50),
                "p90_ms": at(90),
                "p99_ms": at(99),
            })
        );
    } else {
        println!(
            "{} {:?} calls, {} us idle between ({}): mean {mean:.3} ms, p50 {:.3}, p90 {:.3}, p99 {:.3}",
            args.calls,
            args.kind,
            args.idle_us,
            if args.spin { "spinning" } else { "sleeping" },
            at(50),
            at(90),
            at(99)
        );
    }
    Ok(())
}
