//! Every part rolls and fails without a failed query: under unique-query load (no answer
//! cache hits), the embedder job and the balancer job are rolled to a new version (Nomad
//! canaries beside the running instances, promotion, replacement one at a time), and one
//! of the two embedders is killed with SIGKILL. All real: two embedders and two balancers
//! sharing the public port under Nomad, Consul health, the real model.
//! Needs the cluster (scripts/test.sh starts it and runs this).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    corpus_slice, deploy_with, nomad_addr, passing, pids_of, signal, start_load, stop_jobs,
    unique_questions, Pace,
};
use serde_json::Value;

async fn get(url: String) -> Value {
    reqwest::get(&url).await.unwrap().json().await.unwrap()
}

/// Register `job` again with one environment variable changed: a new version, which Nomad
/// rolls out with the job's update block. Returns when that deployment succeeded.
async fn roll(job: &str, round: &str) {
    let mut spec = get(format!("{}/v1/job/{job}", nomad_addr())).await;
    let env = &mut spec["TaskGroups"][0]["Tasks"][0]["Env"];
    if env.is_null() {
        *env = serde_json::json!({});
    }
    env["SIMQ_TEST_ROLL"] = Value::String(round.into());
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/jobs", nomad_addr()))
        .json(&serde_json::json!({ "Job": spec }))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "register {job}: {}",
        resp.text().await.unwrap()
    );
    let version = get(format!("{}/v1/job/{job}", nomad_addr())).await["Version"]
        .as_u64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = get(format!("{}/v1/job/{job}/deployment", nomad_addr())).await;
        if d["JobVersion"].as_u64() == Some(version) {
            match d["Status"].as_str() {
                Some("successful") => return,
                Some("failed" | "cancelled") => panic!("deployment of {job} v{version}: {d}"),
                _ => {}
            }
        }
        assert!(
            Instant::now() < deadline,
            "{job} v{version} not deployed in 120 s: {d}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn embedders_and_balancers_roll_and_an_embedder_dies_under_load_with_no_failed_query() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = corpus_slice(tmp.path(), "e2e-corpus.txt", 0..600);
    let dg = tokio::task::spawn_blocking(move || {
        deploy_with(&corpus, 4, 1, 8, &[("SIMQ_BALANCERS", "2")])
    })
    .await
    .unwrap();
    assert_eq!(
        passing("simq-embedder").await,
        2,
        "two embedders by default"
    );
    assert_eq!(
        passing("simq-balancer").await,
        2,
        "two balancers sharing the port"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(
        unique_questions(2000, 6000),
        6000,
        Pace::Rate(20.0),
        stop.clone(),
    );
    let started = Instant::now();
    roll("simq-embedder", "1").await;
    eprintln!("embedders rolled in {:?}", started.elapsed());
    let t = Instant::now();
    roll("simq-balancer", "1").await;
    eprintln!("balancers rolled in {:?}", t.elapsed());

    // One of two embedders killed outright: the other answers while Nomad restarts it.
    let embedders = pids_of("simq-embedder", |arg| arg("--grpc-listen").is_some());
    assert_eq!(embedders.len(), 2, "{embedders:?}");
    signal("-KILL", embedders[0]);
    let t = Instant::now();
    while passing("simq-embedder").await < 2 || t.elapsed() < Duration::from_secs(5) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the killed embedder is not back in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("embedder killed and back in {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    assert!(report.ok >= 200, "load ran: {} answered", report.ok);
    report.assert_clean(&format!(
        "rolls and a kill under 20 unique queries/s for {:?}",
        started.elapsed()
    ));
    assert!(report.dgs.iter().all(|d| *d == dg));
    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
