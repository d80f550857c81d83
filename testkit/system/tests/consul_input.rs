//! Consul input is untrusted: catalog entries the balancer cannot use and KV values that
//! are not what they claim are left out and reported, and the balancer keeps following
//! Consul. All real: the stack under Nomad, entries registered with the real Consul
//! agent, the pointer overwritten in real KV.
//! Needs the cluster (scripts/test.sh starts it and runs this).

mod common;

use std::time::{Duration, Instant};

use common::{consul_addr, corpus_slice, deploy, metric, post, status, stop_jobs};
use serde_json::{json, Value};

async fn consul_put(path: &str, body: String) {
    let resp = reqwest::Client::new()
        .put(format!("{}{path}", consul_addr()))
        .body(body)
        .send()
        .await
        .expect("consul answers");
    assert!(resp.status().is_success(), "PUT {path}: {}", resp.status());
}

/// Poll /v1/status until `done` holds (10 s at most), asking a fresh query each time:
/// every one must be answered by `dg`.
async fn until(
    what: &str,
    dg: &str,
    texts: &mut impl Iterator<Item = String>,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = texts.next().expect("enough questions");
        let (code, body) = post("/v1/query", json!({"query": text, "k": 3}).to_string()).await;
        assert_eq!(
            (code, body["dg"].as_str()),
            (200, Some(dg)),
            "while waiting for {what}: {body}"
        );
        let s = status().await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what} within 10 s: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn bad_catalog_entries_and_kv_values_are_reported_and_the_balancer_keeps_following_consul() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, _) = corpus_slice(tmp.path(), "e2e-corpus.txt", 0..600);
    let (_, questions) = corpus_slice(tmp.path(), "questions.txt", 600..1400);
    let dg = tokio::task::spawn_blocking(move || deploy(&corpus, 4, 1, 8))
        .await
        .unwrap();
    let mut texts = questions.into_iter();
    let before = status().await;
    let model = before["active"]["model_id"].as_str().unwrap().to_string();

    // 1. Catalog entries: an IPv6 embedder (once a panic of the Consul watcher), an
    //    address that is no host, a shard tag that is no shard of the dg.
    let register = |id: &str, name: &str, address: &str, port: u16, tags: Vec<String>| {
        consul_put(
            "/v1/agent/service/register",
            json!({"ID": id, "Name": name, "Address": address, "Port": port, "Tags": tags})
                .to_string(),
        )
    };
    register(
        "test-v6",
        "simq-embedder",
        "::1",
        9,
        vec![format!("model={model}")],
    )
    .await;
    register(
        "test-junk",
        "simq-embedder",
        "not a host!",
        9,
        vec![format!("model={model}")],
    )
    .await;
    register(
        "test-far",
        "simq-shard",
        "127.0.0.1",
        9,
        vec![format!("dg={dg}"), "shard=99".into()],
    )
    .await;
    let s = until("the bad entries reported", &dg, &mut texts, |s| {
        s["active"]["rejected_entries"]
            .as_array()
            .is_some_and(|r| r.len() == 2)
    })
    .await;
    let rejected = s["active"]["rejected_entries"].to_string();
    assert!(
        rejected.contains("test-junk") && rejected.contains("test-far"),
        "{rejected}"
    );
    assert!(
        s["active"]["healthy_embedders"]
            .to_string()
            .contains("[::1]:9"),
        "the IPv6 entry is an endpoint like any other: {s}"
    );
    assert_eq!(
        metric("simq_balancer_consul_rejected_entries").await,
        Some(2.0)
    );

    // 2. The pointer overwritten with a value that names no dg, then a dg nobody published:
    //    each is reported, the dg that runs keeps answering.
    let pointer = reqwest::get(format!("{}/v1/kv/simq/active?raw", consul_addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (bad, says) in [
        (
            json!({"dg": "../../other/key", "previous": null, "flipped_at": ""}),
            "not a dg id",
        ),
        (
            json!({"dg": "dg-0000000000000000", "previous": null, "flipped_at": ""}),
            "no manifest",
        ),
        (json!("not a pointer"), "not an active pointer"),
    ] {
        consul_put("/v1/kv/simq/active", bad.to_string()).await;
        until(&format!("pointer {bad} reported"), &dg, &mut texts, |s| {
            s["consul"]["errors"]["active dg"]
                .as_str()
                .is_some_and(|e| e.contains(says))
        })
        .await;
    }

    // 3. Still following Consul: the good pointer back clears the error, and removing the
    //    bad entries empties the report.
    consul_put("/v1/kv/simq/active", pointer).await;
    for id in ["test-v6", "test-junk", "test-far"] {
        consul_put(&format!("/v1/agent/service/deregister/{id}"), String::new()).await;
    }
    until(
        "errors and rejected entries cleared",
        &dg,
        &mut texts,
        |s| s["consul"]["errors"] == json!({}) && s["active"]["rejected_entries"] == json!([]),
    )
    .await;
    assert_eq!(
        metric("simq_balancer_consul_rejected_entries").await,
        Some(0.0)
    );
    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
