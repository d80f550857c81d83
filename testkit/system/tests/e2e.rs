//! End to end, all real: Consul and Nomad agents, the ONNX model, LMDB shard files, every
//! service a Nomad job, queries over HTTP through the Pingora balancer. Deploys with the
//! same script users run (scripts/deploy.sh), on a sample of the real corpus.
//! Needs the cluster (scripts/test.sh starts it and runs this).

mod common;

use common::{corpus_slice, deploy, post, query, shard_pids, signal, stop_jobs, PORT};
use serde_json::json;

#[tokio::test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn queries_through_nomad_deployed_stack_find_their_originals() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, lines) = corpus_slice(tmp.path(), "e2e-corpus.txt", 0..600);
    // 4 shards x 2 replicas, 8 of about 37 fine clusters probed per query: room for retries
    // and fallbacks.
    let dg = tokio::task::spawn_blocking(move || deploy(&corpus, 4, 2, 8))
        .await
        .unwrap();

    // A corpus query finds itself, from the deployed dg.
    let original = lines
        .iter()
        .find(|l| l.split_whitespace().count() >= 10)
        .unwrap()
        .clone();
    let a = query(&original).await;
    assert_eq!(a["dg"], dg.as_str());
    assert_eq!(a["similar"], original.as_str(), "{a}");
    assert!(a["score"].as_f64().unwrap() > 0.99, "{a}");
    assert_eq!(a["degraded"], false);
    assert_eq!(a["results"].as_array().unwrap().len(), 3);

    // Lightly perturbed queries find their original: a typo, casing, a dropped word.
    let long: Vec<&String> = lines
        .iter()
        .filter(|l| l.split_whitespace().count() >= 10)
        .step_by(7)
        .take(5)
        .collect();
    for o in long {
        let words: Vec<&str> = o.split_whitespace().collect();
        let longest = words
            .iter()
            .enumerate()
            .max_by_key(|(_, w)| w.len())
            .unwrap()
            .0;
        let mut typo: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        let w: Vec<char> = typo[longest].chars().collect();
        typo[longest] = [&w[..1], &w[2..3], &w[1..2], &w[3..]]
            .iter()
            .map(|s| s.iter().collect::<String>())
            .collect();
        let mut dropped: Vec<&str> = words.clone();
        dropped.remove(words.len() / 2);
        for perturbed in [typo.join(" "), o.to_uppercase(), dropped.join(" ")] {
            let a = query(&perturbed).await;
            assert_eq!(
                a["similar"],
                o.as_str(),
                "{perturbed:?} should find {o:?}: {a}"
            );
        }
    }

    // The same query again comes from the cache.
    assert_eq!(query(&original).await["cached"], true);

    // Bad input: 4xx with a JSON error naming the problem.
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/query", "not json".into(), 400, "invalid_json"),
        ("/v1/query", r#"{"query": 42}"#.into(), 400, "wrong_type"),
        ("/v1/query", r#"{"query": "  "}"#.into(), 400, "empty_query"),
        (
            "/v1/query",
            json!({"query": "x".repeat(1001)}).to_string(),
            400,
            "query_too_long",
        ),
        (
            "/v1/query",
            r#"{"query": "x", "k": 0}"#.into(),
            400,
            "k_out_of_range",
        ),
        ("/v1/query", r#"{"text": "x"}"#.into(), 400, "missing_field"),
        (
            "/v1/query",
            r#"{"query": "x", "top_k": 3}"#.into(),
            400,
            "unknown_field",
        ),
        (
            "/v1/query",
            json!({"query": "\u{200b}\u{2060} \u{feff}"}).to_string(),
            400,
            "empty_query",
        ),
        ("/v1/query", "x".repeat(20_000), 413, "body_too_large"),
        ("/nope", "{}".into(), 404, "not_found"),
    ];
    for (path, body, status, kind) in cases {
        let (got, err) = post(path, body).await;
        assert_eq!(
            (got, err["error"]["kind"].as_str()),
            (status, Some(kind)),
            "{err}"
        );
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    let get = reqwest::get(format!("http://127.0.0.1:{PORT}/v1/query"))
        .await
        .unwrap();
    assert_eq!(get.status().as_u16(), 405);

    let status = common::status().await;
    assert_eq!(status["active"]["dg"], dg.as_str());
    assert_eq!(status["active"]["shards"].as_array().unwrap().len(), 4);
    let metrics = simq_testkit::get_text(&format!("http://127.0.0.1:{PORT}/metrics")).await;
    assert!(
        metrics.contains("simq_balancer_requests_total{status=\"400\"}"),
        "{metrics}"
    );
    // Nothing in flight between queries; the gauge is exported with the other metrics.
    assert_eq!(status["inflight_queries"], 0, "{status}");
    assert!(
        metrics.contains("simq_balancer_inflight_requests 0"),
        "{metrics}"
    );

    // Loss of one replica of two: every query still succeeds (retried on the other
    // replica while Consul has not yet seen the loss), none degraded.
    let pids = shard_pids(&dg, 0);
    assert_eq!(pids.len(), 2, "two replicas of shard 0 run: {pids:?}");
    signal("-KILL", pids[0]);
    for t in lines.iter().skip(300).take(40) {
        let a = query(t).await;
        assert_eq!(
            a["degraded"], false,
            "one lost replica of two degrades nothing: {a}"
        );
    }

    // A shard with no healthy replica: its queries go to the next-nearest shard instead,
    // say so, and still answer 200.
    let nomad = common::nomad_addr();
    let scale =
        json!({"Count": 0, "Target": {"Group": "shard-0"}, "Message": "e2e: take shard 0 away"});
    let r = reqwest::Client::new()
        .post(format!("{nomad}/v1/job/simq-shards/scale"))
        .body(scale.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let s = common::status().await;
        if s["active"]["shards"][0]["healthy_replicas"]
            .as_array()
            .is_some_and(|r| r.is_empty())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "shard 0 still has replicas: {s}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut degraded = 0;
    for t in lines.iter().skip(400).take(60) {
        let a = query(t).await;
        let rows = a["results"].as_array().unwrap();
        assert!(
            rows.iter().all(|r| r["shard"] != 0),
            "no answer from a shard without replicas: {a}"
        );
        if a["degraded"] == true {
            degraded += 1;
            let note = a["notes"][0].as_str().unwrap();
            assert!(
                note.starts_with("shard 0 has no healthy replica; its clusters were replaced"),
                "{note}"
            );
        }
    }
    assert!(
        degraded > 0,
        "some of 60 queries route to shard 0 and must fall back"
    );

    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
