//! End to end, all real: Consul and Nomad agents, the ONNX model, LMDB shard files, every
//! service a Nomad job, queries over HTTP through the Pingora balancer. Deploys with the
//! same script users run (scripts/deploy.sh), on a sample of the real corpus.
//! Needs the cluster (scripts/test.sh starts it and runs this).

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

const PORT: u16 = 18080;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// target/<profile>/ holding all workspace binaries (cargo builds them for tests).
fn bin_dir() -> PathBuf {
    std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().to_path_buf()
}

async fn post(path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{PORT}{path}"))
        .body(body)
        .send()
        .await
        .expect("balancer answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn query(text: &str) -> Value {
    let (status, body) = post("/v1/query", json!({"query": text, "k": 3}).to_string()).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn stop_jobs() {
    for job in ["simq-balancer", "simq-shards", "simq-embedder", "simq-blobs"] {
        let _ = reqwest::blocking::Client::new()
            .delete(format!("{}/v1/job/{job}?purge=true", std::env::var("NOMAD_ADDR").unwrap_or("http://127.0.0.1:4646".into())))
            .send();
    }
}

#[tokio::test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn queries_through_nomad_deployed_stack_find_their_originals() {
    let source = std::env::var("SIMQ_TEST_CORPUS").expect("SIMQ_TEST_CORPUS (scripts/test.sh sets it)");
    let lines: Vec<String> = std::fs::read_to_string(&source).unwrap().lines().take(600).map(String::from).collect();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("e2e-corpus.txt");
    std::fs::write(&corpus, lines.join("\n") + "\n").unwrap();

    let out = Command::new("bash")
        .arg(repo_root().join("scripts/deploy.sh"))
        .env("SIMQ_BIN_DIR", bin_dir())
        .env("SIMQ_CORPUS", &corpus)
        .env("SIMQ_SHARDS", "3")
        .env("SIMQ_PORT", PORT.to_string())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        tokio::task::spawn_blocking(stop_jobs).await.unwrap();
        panic!("deploy failed:\n{log}");
    }
    let dg = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(dg.starts_with("dg-"), "deploy prints the dg: {dg:?}\n{log}");

    // A corpus query finds itself, from the deployed dg.
    let original = lines.iter().find(|l| l.split_whitespace().count() >= 10).unwrap().clone();
    let a = query(&original).await;
    assert_eq!(a["dg"], dg.as_str());
    assert_eq!(a["similar"], original.as_str(), "{a}");
    assert!(a["score"].as_f64().unwrap() > 0.99, "{a}");
    assert_eq!(a["degraded"], false);
    assert_eq!(a["results"].as_array().unwrap().len(), 3);

    // Lightly perturbed queries find their original: a typo, casing, a dropped word.
    let long: Vec<&String> = lines.iter().filter(|l| l.split_whitespace().count() >= 10).step_by(7).take(5).collect();
    for o in long {
        let words: Vec<&str> = o.split_whitespace().collect();
        let longest = words.iter().enumerate().max_by_key(|(_, w)| w.len()).unwrap().0;
        let mut typo: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        let w: Vec<char> = typo[longest].chars().collect();
        typo[longest] = [&w[..1], &w[2..3], &w[1..2], &w[3..]].iter().map(|s| s.iter().collect::<String>()).collect();
        let mut dropped: Vec<&str> = words.clone();
        dropped.remove(words.len() / 2);
        for perturbed in [typo.join(" "), o.to_uppercase(), dropped.join(" ")] {
            let a = query(&perturbed).await;
            assert_eq!(a["similar"], o.as_str(), "{perturbed:?} should find {o:?}: {a}");
        }
    }

    // The same query again comes from the cache.
    assert_eq!(query(&original).await["cached"], true);

    // Bad input: 4xx with a JSON error naming the problem.
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/query", "not json".into(), 400, "invalid_json"),
        ("/v1/query", r#"{"query": 42}"#.into(), 400, "wrong_type"),
        ("/v1/query", r#"{"query": "  "}"#.into(), 400, "empty_query"),
        ("/v1/query", json!({"query": "x".repeat(1001)}).to_string(), 400, "query_too_long"),
        ("/v1/query", r#"{"query": "x", "k": 0}"#.into(), 400, "k_out_of_range"),
        ("/v1/query", r#"{"text": "x"}"#.into(), 400, "missing_field"),
        ("/v1/query", "x".repeat(20_000), 413, "body_too_large"),
        ("/nope", "{}".into(), 404, "not_found"),
    ];
    for (path, body, status, kind) in cases {
        let (got, err) = post(path, body).await;
        assert_eq!((got, err["error"]["kind"].as_str()), (status, Some(kind)), "{err}");
        assert!(!err["error"]["message"].as_str().unwrap().is_empty());
    }
    let get = reqwest::get(format!("http://127.0.0.1:{PORT}/v1/query")).await.unwrap();
    assert_eq!(get.status().as_u16(), 405);

    let status: Value = reqwest::get(format!("http://127.0.0.1:{PORT}/v1/status")).await.unwrap().json().await.unwrap();
    assert_eq!(status["active"]["dg"], dg.as_str());
    assert_eq!(status["active"]["shards"].as_array().unwrap().len(), 3);
    let metrics = reqwest::get(format!("http://127.0.0.1:{PORT}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("simq_balancer_requests_total{status=\"400\"}"), "{metrics}");

    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
