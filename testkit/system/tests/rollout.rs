//! Rollouts without downtime, all real (Consul, Nomad, model, LMDB, every service a Nomad
//! job), with bounded query load running through the balancer during each step:
//! A -> B rollout, a corrupt blob, a shard that fails its self-test, two racing flips,
//! re-publishing, and rollback B -> A. Needs the cluster (scripts/test.sh runs this).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{
    build_and_publish, corpus_slice, deploy, indexer, nomad_addr, query, start_load, stop_jobs,
    LoadReport, Pace,
};
use simq_consul::ConsulClient;
use simq_contract::{KvLayout, Manifest};
use simq_indexer::flip::{flip_from, observe, FlipError, Flipped};

const FAST: [&str; 4] = [
    "--healthy-deadline-secs",
    "15",
    "--progress-deadline-secs",
    "20",
];

/// Run `simq-indexer ARGS` while queries flow; returns the command output and the load.
async fn under_load(texts: &[String], args: Vec<String>) -> (std::process::Output, LoadReport) {
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(texts.to_vec(), 20_000, Pace::Serial, stop.clone());
    let out = tokio::task::spawn_blocking(move || {
        indexer(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    // A little more traffic after the command returned.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    (out, load.await.unwrap())
}

fn args(base: &[&str]) -> Vec<String> {
    base.iter()
        .chain(FAST.iter())
        .map(|s| s.to_string())
        .collect()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

async fn active(consul: &ConsulClient, layout: &KvLayout) -> String {
    observe(consul, layout).await.unwrap().active.unwrap().dg
}

/// Every answer names one of `allowed`, and once `last` shows up nothing else does.
fn assert_switch(report: &LoadReport, allowed: &[&str], last: &str) {
    assert!(
        report.failed.is_empty(),
        "failed queries during the change: {:?}",
        report.failed
    );
    assert!(report.ok > 0, "no queries ran");
    assert!(
        report.dgs.iter().all(|d| allowed.contains(&d.as_str())),
        "answers from unexpected dgs: {:?}",
        report.dgs
    );
    if let Some(first) = report.dgs.iter().position(|d| d == last) {
        assert!(
            report.dgs[first..].iter().all(|d| d == last),
            "answers went back after switching to {last}"
        );
    }
}

#[tokio::test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn rollout_lifecycle_has_zero_failed_queries() {
    let tmp = tempfile::tempdir().unwrap();
    let consul = ConsulClient::from_env().unwrap();
    let layout = KvLayout::default();
    let (corpus_a, lines_a) = corpus_slice(tmp.path(), "a.txt", 0..400);
    let (corpus_b, lines_b) = corpus_slice(tmp.path(), "b.txt", 400..800);
    let (corpus_c, _) = corpus_slice(tmp.path(), "c.txt", 800..1200);
    let texts: Vec<String> = lines_a.iter().chain(&lines_b).step_by(3).cloned().collect();
    let out = tmp.path().join("dgs");

    let dg_a = tokio::task::spawn_blocking(move || deploy(&corpus_a, 3, 1, 8))
        .await
        .unwrap();
    assert_eq!(query(&lines_a[5]).await["dg"], dg_a.as_str());
    let (dg_b, dir_b) = build_and_publish(&corpus_b, &out, 3);

    // 6. Publishing an existing dg again is a no-op.
    let blobs = dirs_blobs();
    let again = indexer(&[
        "publish",
        dir_b.to_str().unwrap(),
        "--blobs",
        blobs.to_str().unwrap(),
    ]);
    assert!(again.status.success());
    assert!(
        stderr(&again).contains("already published") && stderr(&again).contains("nothing to do"),
        "{}",
        stderr(&again)
    );

    // 1. A -> B under load: zero failed queries, answers from A or B, then only B.
    let (o, load) = under_load(&texts, args(&["rollout", &dg_b])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("canaries beside"), "{}", stderr(&o));
    assert_switch(&load, &[&dg_a, &dg_b], &dg_b);
    assert_eq!(active(&consul, &layout).await, dg_b);
    for t in texts.iter().take(5) {
        assert_eq!(
            query(t).await["dg"],
            dg_b.as_str(),
            "after the flip only B answers"
        );
    }

    // 2. A corrupt blob (right name, wrong bytes) for one shard of C.
    let (dg_c, _) = build_and_publish(&corpus_c, &out, 3);
    let manifest_c = published(&consul, &layout, &dg_c).await;
    let blob = blobs.join(&manifest_c.shards[0].sha256);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let versions_before = job_versions().await;
    let (o, load) = under_load(&texts, args(&["rollout", &dg_c])).await;
    assert!(!o.status.success(), "rollout of a corrupt blob must fail");
    let err = stderr(&o);
    assert!(
        err.contains("shard-0") && err.to_lowercase().contains("checksum"),
        "names the shard and the cause: {err}"
    );
    assert_switch(&load, &[&dg_b], &dg_b);
    assert_eq!(
        active(&consul, &layout).await,
        dg_b,
        "the active dg stays B"
    );
    wait_reverted_to(&dg_b, versions_before).await;

    // 3. A dg naming a model no embedder here runs or ran is refused before anything
    //    moves (its embedders would have to start first: `rollout --model-dir`).
    let mut other = manifest_c.clone();
    other.model_id = "another-model-000000000000".into();
    let other = other.seal();
    consul
        .kv_put(
            &layout.manifest(&other.dg),
            &serde_json::to_vec(&other).unwrap(),
        )
        .await
        .unwrap();
    let versions_before = job_versions().await;
    let target = other.dg.clone();
    let o = tokio::task::spawn_blocking(move || indexer(&["rollout", &target]))
        .await
        .unwrap();
    assert!(
        !o.status.success(),
        "a dg of a model nobody runs must be refused"
    );
    assert!(
        stderr(&o).contains("another-model-000000000000") && stderr(&o).contains("--model-dir"),
        "{}",
        stderr(&o)
    );
    assert_eq!(job_versions().await, versions_before, "nothing moved");

    //    Blobs that pass their checksums but fail verification: C's intact shard files
    //    handed to the wrong shards (shard 0 gets shard 1's file and back).
    let mut bad = manifest_c.clone();
    let (first, second) = (bad.shards[0].clone(), bad.shards[1].clone());
    bad.shards[0] = simq_contract::kv::ShardEntry { shard: 0, ..second };
    bad.shards[1] = simq_contract::kv::ShardEntry { shard: 1, ..first };
    let bad = bad.seal();
    consul
        .kv_put(
            &layout.manifest(&bad.dg),
            &serde_json::to_vec(&bad).unwrap(),
        )
        .await
        .unwrap();
    // Repair C's blob so only the shard check can fail.
    let p = indexer(&[
        "publish",
        out.join(&dg_c).to_str().unwrap(),
        "--blobs",
        blobs.to_str().unwrap(),
    ]);
    assert!(stderr(&p).contains("1 repaired"), "{}", stderr(&p));
    let versions_before = job_versions().await;
    let (o, load) = under_load(&texts, args(&["rollout", &bad.dg])).await;
    assert!(
        !o.status.success(),
        "rollout of a shard failing its verification must fail"
    );
    let err = stderr(&o);
    assert!(
        err.contains("shard-") && err.contains("holds shard"),
        "names the shard and the cause: {err}"
    );
    assert_switch(&load, &[&dg_b], &dg_b);
    assert_eq!(active(&consul, &layout).await, dg_b);
    wait_reverted_to(&dg_b, versions_before).await;

    // 4. Two concurrent flips from the same state: exactly one wins, the other is told.
    let observed = observe(&consul, &layout).await.unwrap();
    let (x, y) = tokio::join!(
        flip_from(&consul, &layout, &observed, &dg_a),
        flip_from(&consul, &layout, &observed, &dg_c)
    );
    let wins = [&x, &y]
        .iter()
        .filter(|r| matches!(r, Ok(Flipped::Now(_))))
        .count();
    assert_eq!(wins, 1, "exactly one flip wins: {x:?} / {y:?}");
    let lost = [x, y].into_iter().find_map(|r| r.err()).unwrap();
    assert!(matches!(lost, FlipError::LostRace { .. }), "{lost}");
    assert!(lost.to_string().contains("another flip won the race"));
    // Put B back (its shards never stopped serving: the balancer waits for healthy shards).
    let now = observe(&consul, &layout).await.unwrap();
    flip_from(&consul, &layout, &now, &dg_b).await.unwrap();
    let now = observe(&consul, &layout).await.unwrap();
    assert_eq!(now.active.as_ref().unwrap().dg, dg_b);

    // 5. Rollback B -> A under load. The pointer's previous is the loser of the race
    //    branch above, so set it to A explicitly through a flip chain A -> B.
    flip_from(&consul, &layout, &now, &dg_a).await.ok();
    let now = observe(&consul, &layout).await.unwrap();
    flip_from(&consul, &layout, &now, &dg_b).await.unwrap();
    let (o, load) = under_load(&texts, args(&["rollback"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_switch(&load, &[&dg_a, &dg_b], &dg_a);
    assert_eq!(active(&consul, &layout).await, dg_a);
    assert_eq!(query(&texts[1]).await["dg"], dg_a.as_str());

    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}

fn dirs_blobs() -> std::path::PathBuf {
    std::env::var("SIMQ_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/simq")
        })
        .join("blobs")
}

async fn published(consul: &ConsulClient, layout: &KvLayout, dg: &str) -> Manifest {
    let kv = consul
        .kv_get(&layout.manifest(dg), None)
        .await
        .unwrap()
        .value
        .unwrap();
    serde_json::from_slice(&kv.value).unwrap()
}

async fn job_versions() -> usize {
    let v: serde_json::Value =
        reqwest::get(format!("{}/v1/job/simq-shards/versions", nomad_addr()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    v["Versions"].as_array().unwrap().len()
}

/// Nomad itself reverted: a newer job version than the failed one runs dg `dg` again.
async fn wait_reverted_to(dg: &str, versions_before: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let job: serde_json::Value = reqwest::get(format!("{}/v1/job/simq-shards", nomad_addr()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let versions = job_versions().await;
        let running = &job["TaskGroups"][0]["Meta"]["dg"];
        if running == dg && versions >= versions_before + 2 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Nomad did not revert to {dg}: shard-0 meta {running} versions {versions}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// The running instances of the shards job: allocation ids by group name.
async fn running_allocations() -> std::collections::BTreeMap<String, Vec<String>> {
    let allocs: serde_json::Value =
        reqwest::get(format!("{}/v1/job/simq-shards/allocations", nomad_addr()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let mut groups = std::collections::BTreeMap::<String, Vec<String>>::new();
    for a in allocs.as_array().unwrap() {
        if a["ClientStatus"] == "running" && a["DesiredStatus"] == "run" {
            groups
                .entry(a["TaskGroup"].as_str().unwrap().to_string())
                .or_default()
                .push(a["ID"].as_str().unwrap().to_string());
        }
    }
    groups
}

/// The groups of the shards job, by name, and how many of their instances run.
async fn running_groups() -> Vec<(String, usize)> {
    running_allocations()
        .await
        .into_iter()
        .map(|(g, ids)| (g, ids.len()))
        .collect()
}

#[tokio::test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn shard_count_changes_roll_out_without_failed_or_degraded_queries() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, lines) = corpus_slice(tmp.path(), "n.txt", 1200..1800);
    let texts: Vec<String> = lines.iter().step_by(2).cloned().collect();
    let out = tmp.path().join("dgs");
    // 8 of about 37 clusters probed: a query routed to a shard without replicas would come
    // back degraded.
    let corpus_4 = corpus.clone();
    let dg4 = tokio::task::spawn_blocking(move || deploy(&corpus_4, 4, 1, 8))
        .await
        .unwrap();
    let expect = |n: usize| {
        (0..n)
            .map(|s| (format!("shard-{s}"), 1))
            .collect::<Vec<_>>()
    };
    assert_eq!(running_groups().await, expect(4));

    // Fewer shards: the old dg keeps its shard-3 until the flip, then it goes.
    let (dg3, _) = build_and_publish(&corpus, &out, 3);
    let (o, load) = under_load(&texts, args(&["rollout", &dg3])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_switch(&load, &[&dg4, &dg3], &dg3);
    assert_eq!(load.degraded, 0, "degraded answers during 4 -> 3 shards");
    assert!(
        stderr(&o).contains("removed the previous dg's groups shard-3"),
        "{}",
        stderr(&o)
    );
    assert_eq!(running_groups().await, expect(3));

    // More shards: the new groups start beside the changed ones.
    let (dg5, _) = build_and_publish(&corpus, &out, 5);
    let (o, load) = under_load(&texts, args(&["rollout", &dg5])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_switch(&load, &[&dg3, &dg5], &dg5);
    assert_eq!(load.degraded, 0, "degraded answers during 3 -> 5 shards");
    assert_eq!(running_groups().await, expect(5));
    assert_eq!(query(&lines[10]).await["dg"], dg5.as_str());

    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}

#[tokio::test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn an_incremental_dg_restarts_only_its_changed_shards_and_never_answers_a_removed_text() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, lines) = corpus_slice(tmp.path(), "base.txt", 1200..1800);
    let (_, extra) = corpus_slice(tmp.path(), "extra.txt", 5000..5001);
    let texts: Vec<String> = lines.iter().skip(1).step_by(2).cloned().collect();
    let out = tmp.path().join("dgs");
    let corpus_a = corpus.clone();
    let dg_a = tokio::task::spawn_blocking(move || deploy(&corpus_a, 4, 1, 8))
        .await
        .unwrap();
    let (same, dir_a) = build_and_publish(&corpus, &out, 4);
    assert_eq!(
        same, dg_a,
        "the same corpus and options build the deployed dg"
    );

    // One question in, one out: at most two of the four shard files change.
    let (added, removed) = (extra[0].clone(), lines[0].clone());
    let add = tmp.path().join("add.txt");
    let remove = tmp.path().join("remove.txt");
    std::fs::write(&add, format!("{added}\n")).unwrap();
    std::fs::write(&remove, format!("{removed}\n")).unwrap();
    let b = indexer(&[
        "build",
        "--base",
        dir_a.to_str().unwrap(),
        "--add",
        add.to_str().unwrap(),
        "--remove",
        remove.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(b.status.success(), "{}", stderr(&b));
    let dir_b = String::from_utf8_lossy(&b.stdout).trim().to_string();
    let blobs = dirs_blobs();
    let p = indexer(&["publish", &dir_b, "--blobs", blobs.to_str().unwrap()]);
    assert!(p.status.success(), "{}", stderr(&p));
    let dg_b = String::from_utf8_lossy(&p.stdout).trim().to_string();
    let (consul, layout) = (ConsulClient::from_env().unwrap(), KvLayout::default());
    let (a, bm) = (
        published(&consul, &layout, &dg_a).await,
        published(&consul, &layout, &dg_b).await,
    );
    let changed: Vec<String> = (0..4)
        .filter(|&s| a.shards[s].sha256 != bm.shards[s].sha256)
        .map(|s| format!("shard-{s}"))
        .collect();
    assert!(!changed.is_empty() && changed.len() <= 2, "{changed:?}");

    let before = running_allocations().await;
    let (o, load) = under_load(&texts, args(&["rollout", &dg_b])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("keep running as they are"),
        "{}",
        stderr(&o)
    );
    assert_switch(&load, &[&dg_a, &dg_b], &dg_b);
    assert_eq!(
        load.degraded, 0,
        "degraded answers during the incremental rollout"
    );
    let after = running_allocations().await;
    for (group, ids) in &before {
        if changed.contains(group) {
            assert_ne!(after[group], *ids, "{group} changed: new instances");
        } else {
            assert_eq!(after[group], *ids, "{group} kept its file: never restarted");
        }
    }
    assert_eq!(active(&consul, &layout).await, dg_b);

    // The removed question is not answered any more (not even from the answer cache, which
    // is per dg); the added one is.
    let answer = query(&removed).await;
    assert_eq!(answer["dg"], dg_b.as_str());
    let results = answer["results"].as_array().unwrap();
    assert!(
        results.iter().all(|r| r["text"] != removed.as_str()),
        "{answer}"
    );
    assert_eq!(query(&added).await["results"][0]["text"], added.as_str());

    // Back to the base: every query answered throughout.
    let (o, load) = under_load(&texts, args(&["rollback"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_switch(&load, &[&dg_b, &dg_a], &dg_a);
    assert_eq!(
        query(&removed).await["results"][0]["text"],
        removed.as_str()
    );

    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
