//! The query path under unique-query load, all real (Consul, Nomad, model, LMDB, every
//! service a Nomad job): overload is refused fast and the stack recovers by itself, and a
//! rollout at half the measured capacity fails and degrades nothing. Every query is a
//! corpus question used once, so the answer cache never helps. Needs the cluster
//! (scripts/test.sh runs this).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    capacity, corpus_slice, deploy, indexer, quantile_ms, serving_a_with_b_published, start_load,
    stop_jobs, unique_questions, Pace, PORT,
};
use serde_json::{json, Value};

/// Queued texts of every embedder, from their /health (found through Consul).
async fn embedder_queues() -> Vec<u64> {
    let consul = common::consul_addr();
    let entries: Value = reqwest::get(format!("{consul}/v1/health/service/simq-embedder"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut queues = Vec::new();
    for e in entries.as_array().unwrap() {
        let s = &e["Service"];
        let url = format!(
            "http://{}:{}/health",
            s["Address"].as_str().unwrap(),
            s["Meta"]["metrics_port"].as_str().unwrap()
        );
        let health: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
        queues.push(health["queued_texts"].as_u64().unwrap());
    }
    queues
}

#[derive(Default)]
struct Overload {
    ok_ms: Vec<f64>,
    /// Refused at the door: the line ahead was already too long for the deadline.
    refused_ms: Vec<f64>,
    /// Refused after waiting in line, when the rest of the line no longer fit the deadline
    /// and the light contour had no place free in time (balancer/src/query.rs).
    refused_late_ms: Vec<f64>,
    /// Answers that are neither 200 nor a 503 with Retry-After: (status, body).
    other: Vec<(u16, String)>,
}

#[tokio::test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn overload_is_refused_fast_and_the_stack_recovers_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = corpus_slice(tmp.path(), "corpus.txt", 0..600);
    tokio::task::spawn_blocking(move || deploy(&corpus, 4, 1, 8))
        .await
        .unwrap();

    // 200 connections of long unique queries (three questions each) for 10 s; like
    // polite clients they wait the Retry-After second after a refusal.
    let long: Vec<String> = unique_questions(2000, 16_500)
        .chunks(3)
        .map(|c| c.join(" "))
        .collect();
    let long = Arc::new(long);
    let next = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Overload::default()));
    let started = Instant::now();
    let workers = (0..200).map(|_| {
        let (long, next, seen) = (long.clone(), next.clone(), seen.clone());
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            while started.elapsed() < Duration::from_secs(10) {
                let Some(text) = long.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let t = Instant::now();
                let resp = client
                    .post(format!("http://127.0.0.1:{PORT}/v1/query"))
                    .body(json!({"query": text}).to_string())
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                let refused = match resp {
                    Ok(r) if r.status() == 200 => {
                        seen.lock().unwrap().ok_ms.push(ms);
                        false
                    }
                    Ok(r) if r.status() == 503 && r.headers().contains_key("retry-after") => {
                        let body = r.text().await.unwrap_or_default();
                        let mut seen = seen.lock().unwrap();
                        if body.contains("waited") {
                            seen.refused_late_ms.push(ms);
                        } else {
                            seen.refused_ms.push(ms);
                        }
                        true
                    }
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.text().await.unwrap_or_default();
                        seen.lock().unwrap().other.push((status, body));
                        false
                    }
                    Err(e) => {
                        seen.lock().unwrap().other.push((0, e.to_string()));
                        false
                    }
                };
                if refused {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        })
    });
    futures::future::join_all(workers).await;
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let (ok, refused, late) = (
        seen.ok_ms.len(),
        seen.refused_ms.len(),
        seen.refused_late_ms.len(),
    );
    let (ok_p99, refused_p99) = (
        quantile_ms(&seen.ok_ms, 0.99),
        quantile_ms(&seen.refused_ms, 0.99),
    );
    let late_max = seen.refused_late_ms.iter().copied().fold(0.0, f64::max);
    eprintln!(
        "overload: {ok} answered (p99 {ok_p99:.0} ms), {refused} refused at the door (p99 {refused_p99:.1} ms), {late} refused after waiting in line (max {late_max:.0} ms), other {:?}",
        seen.other
    );
    assert!(
        seen.other.is_empty(),
        "only answers and fast refusals: {:?}",
        seen.other
    );
    assert!(
        refused + late > 0,
        "200 connections are beyond capacity: some must be refused"
    );
    assert!(ok > 0, "the admitted queries are answered");
    assert!(
        ok_p99 < 2500.0,
        "admitted queries answer within the deadline: p99 {ok_p99} ms"
    );
    // The 50 ms target is measured by scripts/bench.sh serve (BENCHMARKS.md); here the
    // 200 clients share the 2 cores with the stack, so the test asserts what must never
    // happen: a refusal at the door that costs a caller anything near the 2 s deadline.
    assert!(
        refused_p99 < 1000.0,
        "refusals at the door are fast: p99 {refused_p99} ms"
    );
    // A query admitted to wait whose line then slowed is refused once the rest no longer
    // fits (after a last wait for the light contour, up to 300 ms before the deadline):
    // late by design, so it must stay within the deadline and be the exception.
    assert!(
        late_max < 2000.0 + 500.0,
        "late refusals come within the 2 s deadline: max {late_max} ms"
    );
    assert!(
        late * 10 <= refused + late,
        "late refusals are at most a tenth of all: {late} of {}",
        refused + late
    );

    // Within 5 s of the end, normal queries answer normally and every queue is empty.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        embedder_queues().await.iter().all(|&q| q == 0),
        "embedder queues drained"
    );
    let mut ms = Vec::new();
    for text in unique_questions(19_000, 20) {
        let t = Instant::now();
        let (status, body) = common::post("/v1/query", json!({"query": text}).to_string()).await;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["degraded"], false, "{body}");
    }
    ms.sort_by(f64::total_cmp);
    assert!(
        ms[10] < 200.0,
        "normal latency after the overload: p50 {} ms",
        ms[10]
    );
    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}

#[tokio::test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn a_rollout_at_half_capacity_of_unique_queries_fails_and_degrades_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (dg_a, dg_b) = serving_a_with_b_published(tmp.path()).await;

    let measured = capacity(&unique_questions(2000, 4000), 8, 4.0).await;
    let rate = measured / 2.0;
    eprintln!("capacity {measured:.0} unique queries/s; rollout under {rate:.0}/s");
    let stop = Arc::new(AtomicBool::new(false));
    // Enough unique texts for start_load's longest run (300 s).
    let texts = unique_questions(6000, (rate * 300.0) as usize);
    let load = start_load(texts.clone(), texts.len(), Pace::Rate(rate), stop.clone());
    let target = dg_b.clone();
    let out = tokio::task::spawn_blocking(move || indexer(&["rollout", &target]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    if report.degraded > 0 {
        // The rollout's steps with their times, to place the degraded answers against them.
        eprintln!("rollout log:\n{log}");
    }
    report.assert_clean("the rollout under load");
    assert!(report.dgs.contains(&dg_a) && report.dgs.last() == Some(&dg_b));
    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
