//! Invariant 5: when Consul is unreachable, the balancer keeps serving from the last known
//! good state and recovers by itself. All real: the stack runs under Nomad; the Consul agent
//! is frozen with SIGSTOP (its sockets accept but never answer, the harder failure: every
//! call hangs until its timeout), then thawed with SIGCONT.
//! Needs the cluster (scripts/test.sh starts it and runs this).

mod common;

use std::time::{Duration, Instant};

use common::{
    agent_pid, corpus_slice, deploy_with, metric, post, shard_pids, signal, status, stop_jobs,
    Frozen,
};
use serde_json::json;

/// Ask one query that is not in the balancer's cache; (status, dg).
async fn ask(text: &str) -> (u16, String) {
    let (code, body) = post("/v1/query", json!({"query": text, "k": 3}).to_string()).await;
    (code, body["dg"].as_str().unwrap_or("").to_string())
}

#[tokio::test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn balancer_serves_through_a_consul_outage_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = corpus_slice(tmp.path(), "e2e-corpus.txt", 0..600);
    // Queries the balancer has never seen (no cache hits): the rest of the sample.
    let (_, questions) = corpus_slice(tmp.path(), "questions.txt", 600..2000);
    // A 2 s blocking wait, so a hung Consul is noticed after ~12 s instead of ~42 s.
    let dg = tokio::task::spawn_blocking(move || {
        deploy_with(&corpus, 4, 2, 8, &[("SIMQ_CONSUL_WAIT", "2")])
    })
    .await
    .unwrap();
    let mut texts = questions.iter();
    let before = status().await;
    assert_eq!(
        before["consul"]["errors"],
        serde_json::json!({}),
        "{before}"
    );

    // 20 s of Consul outage with queries running one after another, at most one per 40 ms
    // (at most 500 of the 1,400 questions, however fast this machine answers short ones).
    let outage = Duration::from_secs(20);
    let mut pace = tokio::time::interval(Duration::from_millis(40));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let frozen = Frozen::freeze(agent_pid("consul/consul.pid"));
    let started = Instant::now();
    let (mut ok, mut failed) = (0, Vec::new());
    let mut noticed = None;
    while started.elapsed() < outage {
        pace.tick().await;
        let text = texts.next().expect("enough distinct questions");
        match ask(text).await {
            (200, answered) if answered == dg => ok += 1,
            other => failed.push(other),
        }
        if noticed.is_none() && started.elapsed() > Duration::from_secs(15) {
            noticed = Some(status().await);
        }
    }
    drop(frozen);
    let thawed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(failed.is_empty(), "failed during the outage: {failed:?}");
    assert!(ok >= 50, "only {ok} queries in {outage:?}");
    let noticed = noticed.unwrap();
    assert!(
        noticed["consul"]["errors"]
            .as_object()
            .is_some_and(|e| !e.is_empty()),
        "the balancer reports Consul unreachable: {noticed}"
    );
    assert_eq!(noticed["active"]["dg"], dg.as_str(), "{noticed}");
    println!("consul frozen {outage:?}: {ok} queries, all answered by {dg}");

    // Recovery without help: the error clears and a later Consul answer is recorded ...
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status().await;
        if s["consul"]["errors"] == serde_json::json!({})
            && s["consul"]["last_ok"].as_u64() >= Some(thawed)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery 30 s after thaw: {s}"
        );
        let (code, _) = ask(texts.next().unwrap()).await;
        assert_eq!(code, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let errors = metric("simq_balancer_consul_errors_total")
        .await
        .expect("consul error counter");
    assert!(errors >= 1.0, "{errors} Consul errors counted");

    // ... and the watchers follow changes again: a replica killed now leaves the routing.
    let pids = shard_pids(&dg, 0);
    assert_eq!(pids.len(), 2, "{pids:?}");
    signal("-KILL", pids[0]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status().await;
        if s["active"]["shards"][0]["healthy_replicas"]
            .as_array()
            .is_some_and(|r| r.len() < 2)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a killed replica is still routed to 30 s later: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
