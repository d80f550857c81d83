//! API keys at the balancer, on the real stack: a balancer run with `--api-keys required`
//! under Nomad, keys made, listed and revoked with `simq-indexer keys` in real Consul KV.
//! Needs the cluster (scripts/test.sh starts it and runs this).

mod common;

use std::time::{Duration, Instant};

use common::{consul_addr, corpus_slice, deploy_with, indexer, stop_jobs, PORT};
use serde_json::{json, Value};

/// POST /v1/query with `key` (Bearer) if given: (status, Retry-After, body).
async fn ask(key: Option<&str>, text: &str) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{PORT}/v1/query"))
        .body(json!({"query": text, "k": 3}).to_string());
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.expect("balancer answers");
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, retry, resp.json().await.unwrap_or(Value::Null))
}

async fn get(path: &str, key: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("http://127.0.0.1:{PORT}{path}"));
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let resp = req.send().await.expect("balancer answers");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// `simq-indexer keys create ARGS`: the key printed on stdout.
fn create_key(args: &[&str]) -> String {
    let mut all = vec!["keys", "create"];
    all.extend_from_slice(args);
    let out = indexer(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(key.starts_with("simq_"), "{key}");
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn queries_need_a_valid_key_within_its_rate_and_a_revoked_key_stops_working() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = corpus_slice(tmp.path(), "keys-corpus.txt", 0..600);
    let (_, questions) = corpus_slice(tmp.path(), "questions.txt", 600..700);
    let mut texts = questions.into_iter();
    // An admin key first: deploy.sh checks readiness through simq-indexer status (the
    // instances' admin ports) when keys are required.
    let admin = create_key(&["--label", "test admin", "--admin", "--rate", "100"]);
    let user = create_key(&["--label", "test user", "--rate", "0.5", "--burst", "3"]);
    let _dg = tokio::task::spawn_blocking(move || {
        deploy_with(&corpus, 2, 1, 8, &[("SIMQ_API_KEYS", "required")])
    })
    .await
    .unwrap();

    // No key, a made-up key, a malformed one: 401 with a JSON error naming the problem.
    let (code, _, body) = ask(None, &texts.next().unwrap()).await;
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (401, Some("missing_api_key")),
        "{body}"
    );
    let forged = format!("simq_{}_{}", &user[5..13], "0".repeat(32));
    let (code, _, body) = ask(Some(&forged), &texts.next().unwrap()).await;
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (401, Some("invalid_api_key")),
        "{body}"
    );
    let (code, _, body) = ask(Some("hunter2"), &texts.next().unwrap()).await;
    assert_eq!(
        (code, body["error"]["kind"].as_str()),
        (401, Some("invalid_api_key")),
        "{body}"
    );

    // /health stays open; /v1/status and /metrics need an admin key on the public port.
    assert_eq!(get("/health", None).await.0, 200);
    assert_eq!(get("/v1/status", None).await.0, 401);
    assert_eq!(get("/v1/status", Some(&user)).await.0, 403);
    let (code, status) = get("/v1/status", Some(&admin)).await;
    assert_eq!(code, 200, "{status}");
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["api_keys"]["mode"], "required");
    assert_eq!(status["api_keys"]["keys"], 2);

    // A valid key answers; over its burst of 3 (0.5/s) it gets 429 with Retry-After.
    let mut answered = 0;
    let mut limited = None;
    for _ in 0..5 {
        let (code, retry, body) = ask(Some(&user), &texts.next().unwrap()).await;
        match code {
            200 => answered += 1,
            429 => {
                limited = Some((retry, body));
                break;
            }
            _ => panic!("unexpected {code}: {body}"),
        }
    }
    assert_eq!(answered, 3, "the burst");
    let (retry, body) = limited.expect("a query over the rate gets 429");
    assert_eq!(body["error"]["kind"], "rate_limited", "{body}");
    assert!(
        retry.is_some_and(|r| r.parse::<u32>().unwrap() >= 1),
        "Retry-After"
    );

    // KV holds the hash, never the key; keys list shows ids and labels, never keys.
    let id = &user[5..13];
    let record: Value = reqwest::get(format!("{}/v1/kv/simq/keys/{id}?raw", consul_addr()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(record["id"], id);
    assert!(
        !record.to_string().contains(&user[14..]),
        "the secret is not in KV"
    );
    let list = indexer(&["keys", "list"]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains(id) && listed.contains("test user"),
        "{listed}"
    );
    assert!(!listed.contains(&user[14..]) && !listed.contains(&admin[14..]));

    // Refusals are counted by kind (the keyless query and the keyless /v1/status),
    // queries by key id.
    let (_, metrics) = get("/metrics", Some(&admin)).await;
    assert!(
        metrics.contains("simq_balancer_auth_refusals_total{kind=\"missing_api_key\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "simq_balancer_key_queries_total{{key_id=\"{id}\"}} 3"
    )));

    // Revoked: refused as soon as the balancer's blocking query sees the change.
    let revoke = indexer(&["keys", "revoke", id]);
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let again = indexer(&["keys", "revoke", id]);
    assert!(
        !again.status.success(),
        "revoking an unknown id is an error"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, _, body) = ask(Some(&user), &texts.next().unwrap()).await;
        if code == 401 {
            assert_eq!(body["error"]["kind"], "invalid_api_key");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a revoked key still answered {code} after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _, body) = ask(Some(&admin), &texts.next().unwrap()).await;
    assert_eq!(code, 200, "other keys keep working: {body}");

    let _ = indexer(&["keys", "revoke", &admin[5..13]]);
    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
