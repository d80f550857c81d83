//! One rollout at a time, and an interrupted rollout converges when run again: under
//! unique-query load, a rollout is started, a second one is refused naming the first, the
//! first is interrupted with SIGINT (Ctrl-C) while it waits for its canaries, and the same
//! command run again finishes the rollout. Zero failed queries throughout. All real:
//! Consul sessions and KV, Nomad deployments, the stack under Nomad.
//! Needs the cluster (scripts/test.sh starts it and runs this).

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    bin_dir, indexer, serving_a_with_b_published, signal, start_load, stop_jobs, unique_questions,
    Pace,
};
use simq_consul::ConsulClient;
use simq_contract::KvLayout;

async fn lock_held(consul: &ConsulClient) -> bool {
    let key = KvLayout::default().rollout_lock();
    consul.kv_get(&key, None).await.unwrap().value.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn a_second_rollout_is_refused_and_an_interrupted_one_converges_when_run_again() {
    let tmp = tempfile::tempdir().unwrap();
    let consul = ConsulClient::from_env().unwrap();
    let (dg_a, dg_b) = serving_a_with_b_published(tmp.path()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(
        unique_questions(2000, 6000),
        6000,
        Pace::Rate(10.0),
        stop.clone(),
    );

    // The first rollout takes the lock ...
    let first = Command::new(bin_dir().join("simq-indexer"))
        .args(["rollout", &dg_b])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !lock_held(&consul).await {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the rollout took no lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ... a second one is refused and says who holds it ...
    let target = dg_b.clone();
    let second = tokio::task::spawn_blocking(move || indexer(&["rollout", &target]))
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr).to_string();
    assert!(
        !second.status.success(),
        "a second rollout ran beside the first"
    );
    assert!(
        said.contains("another rollout is running")
            && said.contains(&format!("pid {}", first.id())),
        "{said}"
    );
    // ... the first is interrupted (Ctrl-C) mid-way and gives the lock back at once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal("-INT", first.id());
    let out = tokio::task::spawn_blocking(move || first.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && said.contains("interrupted"),
        "{said}"
    );
    assert!(!lock_held(&consul).await, "the lock is released on Ctrl-C");

    // The same command again converges: the new dg serves.
    let target = dg_b.clone();
    let again = tokio::task::spawn_blocking(move || indexer(&["rollout", &target]))
        .await
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    report.assert_clean("an interrupted and resumed rollout under 10 unique queries/s");
    assert!(report.dgs.iter().all(|d| *d == dg_a || *d == dg_b));
    assert_eq!(report.dgs.last(), Some(&dg_b));
    assert!(!lock_held(&consul).await, "the lock is released at the end");
    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}

/// A lock whose holder's future is dropped at an await (a cancelled command) is given
/// back at once by its guard, not after the session's TTL. Real Consul sessions and KV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster: run scripts/test.sh"]
async fn a_lock_dropped_without_release_frees_itself_at_once() {
    use simq_indexer::lock::{RolloutLock, LOCK_TTL};
    let consul = ConsulClient::from_env().unwrap();
    let layout = KvLayout::default();
    assert!(
        !lock_held(&consul).await,
        "the lock is free before the test"
    );
    // The holder's work never ends; the caller gives up on it after 300 ms.
    let holder = async {
        let _lock = RolloutLock::acquire(&consul, &layout, "test: dropped holder")
            .await
            .unwrap();
        std::future::pending::<()>().await
    };
    assert!(tokio::time::timeout(Duration::from_millis(300), holder)
        .await
        .is_err());
    let t = Instant::now();
    while lock_held(&consul).await {
        assert!(
            t.elapsed() < LOCK_TTL / 5,
            "the dropped lock is still held after {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
