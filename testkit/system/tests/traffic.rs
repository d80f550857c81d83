//! Traffic split, shadow comparison and progressive rollouts, all real (Consul, Nomad,
//! Prometheus, model, LMDB, every service a Nomad job), with unique queries:
//!
//! 1. a candidate dg started beside the active one (`rollout --candidate-only`) gets the
//!    split's share of distinct users, each user always the same arm, a new salt draws
//!    users again independently, clearing sends everyone back;
//! 2. shadow mode answers from the active dg and records a comparison per query;
//! 3. a progressive rollout of a good dg (the same corpus built with another seed) ends
//!    flipped; one of a worse dg (a third of the corpus) ends with the candidate stopped
//!    and the reason printed. No query fails in any of it.
//!
//! Needs the cluster (scripts/test.sh runs this).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    build_and_publish_with, corpus_slice, deploy, eventually, indexer, start_load,
    start_prometheus, status, stop_jobs, unique_questions, Pace, PORT,
};
use serde_json::{json, Value};
use simq_contract::traffic::arm_of;
use simq_contract::Arm;

const PROMETHEUS: &str = "127.0.0.1:19091";

/// Ask as `user` (the X-User-Id header, when given); every query must be answered.
async fn ask(http: &reqwest::Client, user: Option<&str>, text: &str) -> Value {
    let mut req = http
        .post(format!("http://127.0.0.1:{PORT}/v1/query"))
        .body(json!({"query": text, "k": 3}).to_string());
    if let Some(u) = user {
        req = req.header("x-user-id", u);
    }
    let resp = req.send().await.expect("balancer answers");
    let code = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(code, 200, "query {text:?} as {user:?} failed: {body}");
    assert_eq!(body["degraded"], false, "{body}");
    body
}

/// A metric's value on the balancer (the full series name with labels, as exposed).
async fn metric(series: &str) -> f64 {
    common::metric(series).await.unwrap_or(0.0)
}

fn run(args: &[&str]) -> std::process::Output {
    let out = indexer(args);
    eprintln!(
        "simq-indexer {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Wait until the balancer applies the split with `salt`, `weight` and `shadow` and sends
/// its candidate traffic.
async fn split_serving(salt: &str, weight: f64, shadow: f64) {
    eventually(
        Duration::from_secs(15),
        "the balancer serves the split",
        async || {
            let t = status().await["traffic"].clone();
            if t["salt"] == salt
                && t["weight"] == weight
                && t["shadow"] == shadow
                && t["serving"] == true
            {
                Ok(())
            } else {
                Err(t.to_string())
            }
        },
    )
    .await
}

/// The arm each user gets for one new question each; asserts every answer came from
/// that arm's dg.
async fn arms_of(
    http: &reqwest::Client,
    users: &[String],
    questions: &mut impl Iterator<Item = String>,
    active: &str,
    candidate: &str,
) -> Vec<Arm> {
    let mut arms = Vec::new();
    for u in users {
        let a = ask(http, Some(u), &questions.next().unwrap()).await;
        let arm = match a["arm"].as_str() {
            Some("candidate") => Arm::Candidate,
            Some("active") => Arm::Active,
            other => panic!("no arm in the answer: {other:?}"),
        };
        let want = if arm == Arm::Candidate {
            candidate
        } else {
            active
        };
        assert_eq!(a["dg"], want, "{a}");
        arms.push(arm);
    }
    arms
}

/// Set a split of weight 0.2 under `salt` and ask once as each user: every user's arm is
/// the hash rule's. Returns the arms.
async fn experiment(
    http: &reqwest::Client,
    salt: &str,
    users: &[String],
    questions: &mut impl Iterator<Item = String>,
    active: &str,
    candidate: &str,
) -> Vec<Arm> {
    let set = run(&[
        "traffic", "set", candidate, "--weight", "0.2", "--salt", salt,
    ]);
    assert!(set.status.success());
    split_serving(salt, 0.2, 0.0).await;
    let arms = arms_of(http, users, questions, active, candidate).await;
    let predicted: Vec<Arm> = users
        .iter()
        .map(|u| arm_of(salt, &format!("user:{u}"), 0.2))
        .collect();
    assert_eq!(arms, predicted, "each user's arm is the hash rule's");
    arms
}

#[tokio::test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn traffic_split_shadow_and_progressive_rollouts_without_a_failed_query() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, lines) = corpus_slice(tmp.path(), "a.txt", 0..600);
    // A worse corpus: every third question of the active one.
    let worse_corpus = tmp.path().join("third.txt");
    let third: Vec<&str> = lines.iter().step_by(3).map(String::as_str).collect();
    std::fs::write(&worse_corpus, third.join("\n") + "\n").unwrap();
    let corpus_a = corpus.clone();
    // nprobe 64 probes every fine cluster of these small dgs: the good candidate (the same
    // corpus built with another seed) then finds what the active dg finds.
    let dg_a = tokio::task::spawn_blocking(move || deploy(&corpus_a, 4, 1, 64))
        .await
        .unwrap();
    let dgs = tmp.path().join("dgs");
    let (good, _) = build_and_publish_with(&corpus, &dgs, 4, &["--seed", "7"]);
    let (worse, _) = build_and_publish_with(&worse_corpus, &dgs, 4, &[]);
    assert!(good != dg_a && worse != dg_a && good != worse);
    let prometheus_dir = tmp.path().join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).unwrap();
    let _prometheus = start_prometheus(&prometheus_dir, PROMETHEUS);
    let mut questions = unique_questions(5000, 2500).into_iter();
    let http = reqwest::Client::new();

    // 1. The candidate's shards start beside the active dg's; nothing is flipped.
    let out = run(&["rollout", &good, "--candidate-only"]);
    assert!(out.status.success());
    assert_eq!(status().await["active"]["dg"], dg_a.as_str());
    let t = status().await["traffic"].clone();
    assert!(t.is_null(), "no split yet: {t}");

    let users: Vec<String> = (0..300).map(|i| format!("u{i}")).collect();
    let first = experiment(&http, "exp-1", &users, &mut questions, &dg_a, &good).await;
    let share = first.iter().filter(|a| **a == Arm::Candidate).count() as f64 / 300.0;
    // 300 users: the binomial standard deviation at 0.2 is 0.023; 3 of them.
    eprintln!("weight 0.2: {share:.3} of 300 distinct users on the candidate");
    assert!((share - 0.2).abs() <= 0.07, "share {share}");
    // The same users again, with new questions: the same arms.
    let again = arms_of(&http, &users[..60], &mut questions, &dg_a, &good).await;
    assert_eq!(again, first[..60], "a user keeps the arm");
    assert!(
        metric(r#"simq_balancer_arm_answers_total{arm="candidate",outcome="ok"}"#).await >= 1.0
    );

    // Another salt: users are drawn again, independently of the first experiment.
    let second = experiment(&http, "exp-2", &users, &mut questions, &dg_a, &good).await;
    let both = first
        .iter()
        .zip(&second)
        .filter(|(a, b)| **a == Arm::Candidate && **b == Arm::Candidate)
        .count() as f64
        / 300.0;
    // Independent draws: 0.2 x 0.2 = 0.04 of users on the candidate both times (sd 0.011).
    eprintln!("candidate under both salts: {both:.3} of users (independent: 0.04)");
    assert!(both <= 0.08, "{both}");
    assert_ne!(first, second);

    // 2. Shadow: every query answered by the active dg, and compared with the candidate.
    assert!(
        run(&["traffic", "set", &good, "--weight", "0", "--shadow", "1"])
            .status
            .success()
    );
    split_serving("exp-2", 0.0, 1.0).await;
    let pairs = async || {
        let mut n = 0.0;
        for o in ["agree", "differ", "failed"] {
            n += metric(&format!(
                r#"simq_balancer_shadow_pairs_total{{outcome="{o}"}}"#
            ))
            .await;
        }
        n
    };
    let before = pairs().await;
    for _ in 0..40 {
        let a = ask(&http, None, &questions.next().unwrap()).await;
        assert_eq!(
            (a["arm"].as_str(), a["dg"].as_str()),
            (Some("active"), Some(dg_a.as_str()))
        );
    }
    eventually(
        Duration::from_secs(10),
        "40 shadow comparisons",
        async || {
            let n = pairs().await - before;
            if n >= 40.0 {
                Ok(())
            } else {
                Err(format!("{n}"))
            }
        },
    )
    .await;
    assert_eq!(
        metric(r#"simq_balancer_shadow_pairs_total{outcome="failed"}"#).await,
        0.0
    );
    let overlap = metric("simq_balancer_shadow_overlap_ratio_sum").await
        / metric("simq_balancer_shadow_overlap_ratio_count").await;
    eprintln!(
        "shadow: mean overlap@3 {overlap:.3} against the same corpus built with another seed"
    );
    assert!(overlap > 0.9, "{overlap}");
    for arm in ["active", "candidate"] {
        assert!(
            metric(&format!(
                r#"simq_balancer_shadow_seconds_count{{arm="{arm}"}}"#
            ))
            .await
                >= 40.0
        );
    }

    // Clearing sends everyone back to the active dg.
    assert!(run(&["traffic", "clear"]).status.success());
    eventually(Duration::from_secs(10), "the split cleared", async || {
        let t = status().await["traffic"].clone();
        if t.is_null() {
            Ok(())
        } else {
            Err(t.to_string())
        }
    })
    .await;
    let cleared = arms_of(&http, &users[..60], &mut questions, &dg_a, &good).await;
    assert!(cleared.iter().all(|a| *a == Arm::Active));

    // 3. Progressive rollouts under unique-query load (4 queries/s, no X-User-Id: each
    // query is its own user).
    let prometheus = format!("http://{PROMETHEUS}");
    let judge = |dg: &str, steps: &str| -> Vec<String> {
        [
            "rollout",
            dg,
            "--progressive",
            steps,
            "--step-secs",
            "15",
            "--shadow",
            "1",
            "--prometheus",
            prometheus.as_str(),
            "--min-samples",
            "10",
            // Both arms share 2 cores and every query is shadowed: latency is not what
            // this test judges.
            "--max-p99-ratio",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let under_load = async |args: Vec<String>, texts: Vec<String>| {
        let stop = Arc::new(AtomicBool::new(false));
        let load = start_load(texts, 1000, Pace::Rate(4.0), stop.clone());
        let out = tokio::task::spawn_blocking(move || {
            run(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::Relaxed);
        (out, load.await.unwrap())
    };

    // A good candidate (same corpus, another k-means seed): every step passes, flipped.
    let texts: Vec<String> = questions.by_ref().take(500).collect();
    let (out, load) = under_load(judge(&good, "0.25,0.5"), texts).await;
    load.assert_clean("the progressive rollout of a good dg");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status().await["active"]["dg"], good.as_str());
    assert!(
        status().await["traffic"].is_null(),
        "the split is cleared after the flip"
    );

    // A worse candidate (a third of the corpus): a step fails, the candidate stops.
    let texts: Vec<String> = questions.by_ref().take(500).collect();
    let (out, load) = under_load(judge(&worse, "0.25"), texts).await;
    load.assert_clean("the progressive rollout of a worse dg");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("progressive rollout of {worse} stopped"))
            && (err.contains("overlap:") || err.contains("top1:")),
        "the reason is printed: {err}"
    );
    assert_eq!(status().await["active"]["dg"], good.as_str());
    assert!(status().await["traffic"].is_null());
    let shown = run(&["status"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains(&format!("shards job runs: {good}")),
        "the candidate's canaries are gone: {shown}"
    );

    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
