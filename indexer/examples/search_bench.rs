//! Time the query path's search part alone on a built dg: routing (`CentroidMap::plan`)
//! and each asked shard's `search`, in one thread, on stored items as queries.
//!
//! `cargo run --release -p simq-indexer --example search_bench -- DG_DIR [QUERIES] [NPROBE] [ROUNDS]`

use std::path::PathBuf;
use std::time::Instant;

use simq_indexer::eval::{sample, DgDir};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .expect("usage: search_bench DG_DIR [QUERIES] [NPROBE] [ROUNDS]"),
    );
    let n: usize = args.next().map_or(Ok(500), |a| a.parse())?;
    let nprobe: usize = args.next().map_or(Ok(576), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let dg = DgDir::open(&dir)?;
    let items = dg.items()?;
    // The same queries as `simq-indexer eval`'s (stored items spread over the corpus).
    let queries: Vec<&[f32]> = sample(&items, n)
        .into_iter()
        .map(|item| item.vector.as_slice())
        .collect();
    for round in 0..rounds {
        let (mut route, mut search, mut calls) = (Vec::new(), Vec::new(), 0usize);
        for &q in &queries {
            let t = Instant::now();
            let plan = dg.map.plan(q, nprobe, |_| true);
            route.push(t.elapsed().as_secs_f64() * 1e3);
            for (s, clusters) in &plan.shards {
                let t = Instant::now();
                std::hint::black_box(dg.shards[*s as usize].search(q, 10, clusters)?);
                search.push(t.elapsed().as_secs_f64() * 1e3);
                calls += 1;
            }
        }
        let stat = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v.iter().sum::<f64>() / v.len() as f64, v[v.len() / 2])
        };
        let (rm, rp) = stat(&mut route);
        let (sm, sp) = stat(&mut search);
        println!(
            "round {round}: {} queries, route mean {rm:.3} p50 {rp:.3} ms; {:.2} shard searches per query, each mean {sm:.3} p50 {sp:.3} ms",
            queries.len(),
            calls as f64 / queries.len() as f64
        );
    }
    Ok(())
}
