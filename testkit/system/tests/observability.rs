//! The repo's monitoring set-up against the real stack: Prometheus (built by
//! scripts/setup.sh) finds every simq instance through Consul with
//! consul/prometheus/prometheus.yml, scrapes them all and loads the alert rules; every
//! service's /metrics passes `promtool check metrics` (naming, units, help texts).
//! Needs the cluster (scripts/test.sh starts it and runs this).

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    corpus_slice, deploy, eventually, prometheus_dir, query, repo_root, start_prometheus, stop_jobs,
};
use serde_json::Value;

const PROMETHEUS: &str = "127.0.0.1:19090";

async fn api(path: &str) -> Value {
    reqwest::get(format!("http://{PROMETHEUS}{path}"))
        .await
        .and_then(|r| r.error_for_status())
        .expect("prometheus answers")
        .json()
        .await
        .expect("JSON")
}

#[tokio::test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn prometheus_finds_and_scrapes_every_instance_through_consul() {
    let tmp = tempfile::tempdir().unwrap();
    let (corpus, lines) = corpus_slice(tmp.path(), "e2e-corpus.txt", 0..600);
    let dg = tokio::task::spawn_blocking(move || deploy(&corpus, 4, 2, 8))
        .await
        .unwrap();
    for l in lines.iter().take(5) {
        query(l).await;
    }

    let _prometheus = start_prometheus(tmp.path(), PROMETHEUS);

    // Every instance is discovered and up: 1 balancer (the tests' default), 2 embedders,
    // 4 shards x 2 replicas.
    let targets = eventually(Duration::from_secs(60), "all 11 targets up", async || {
        let t = reqwest::get(format!("http://{PROMETHEUS}/api/v1/targets"))
            .await
            .map_err(|e| e.to_string())?
            .json::<Value>()
            .await
            .map_err(|e| e.to_string())?;
        let active = t["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let up = active.iter().filter(|x| x["health"] == "up").count();
        if up == 11 && active.len() == 11 {
            Ok(active)
        } else {
            Err(format!("{up} of {} up: {t}", active.len()))
        }
    })
    .await;
    let mut per_service: BTreeMap<String, usize> = BTreeMap::new();
    let mut shards: BTreeMap<String, usize> = BTreeMap::new();
    for t in &targets {
        let labels = &t["labels"];
        *per_service
            .entry(labels["service"].as_str().unwrap().to_string())
            .or_default() += 1;
        if labels["service"] == "simq-shard" {
            assert_eq!(labels["dg"], dg.as_str(), "{t}");
            *shards
                .entry(labels["shard"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(
        per_service,
        BTreeMap::from([
            ("simq-balancer".to_string(), 1),
            ("simq-embedder".to_string(), 2),
            ("simq-shard".to_string(), 8)
        ])
    );
    assert_eq!(
        shards,
        (0..4)
            .map(|s| (s.to_string(), 2))
            .collect::<BTreeMap<_, _>>()
    );

    // The scraped numbers are the services' own: the queries above were counted.
    eventually(
        Duration::from_secs(20),
        "query counters scraped",
        async || {
            let v = api(
                "/api/v1/query?query=sum(simq_balancer_requests_total%7Bstatus%3D%22200%22%7D)",
            )
            .await;
            let n: f64 = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            if n >= 5.0 {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    )
    .await;

    // The alert rules load and evaluate without error.
    eventually(
        Duration::from_secs(40),
        "all 7 rules evaluated ok",
        async || {
            let v = api("/api/v1/rules").await;
            let rules = v["data"]["groups"][0]["rules"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if rules.len() == 7 && rules.iter().all(|r| r["health"] == "ok") {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    )
    .await;

    // Every service's exposition passes promtool's lint.
    let promtool = prometheus_dir().join("promtool");
    for service in ["simq-balancer", "simq-embedder", "simq-shard"] {
        let t = targets
            .iter()
            .find(|t| t["labels"]["service"] == service)
            .unwrap();
        let text = reqwest::get(t["scrapeUrl"].as_str().unwrap())
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut lint = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        lint.stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = lint.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics on {service}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Every query of the Grafana dashboard parses and returns series from the real
    // Prometheus (rates need two scrapes in their window: keep querying meanwhile).
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("consul/grafana/simq-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let exprs: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| {
            p["targets"].as_array().unwrap().iter().map(move |t| {
                (
                    p["title"].as_str().unwrap().to_string(),
                    t["expr"].as_str().unwrap().to_string(),
                )
            })
        })
        .collect();
    assert!(exprs.len() >= 14, "{} queries", exprs.len());
    let mut texts = lines.iter().skip(5);
    eventually(
        Duration::from_secs(60),
        "every dashboard query returns series",
        async || {
            // A fresh query keeps the rates above zero.
            query(texts.next().expect("enough lines")).await;
            let mut empty = Vec::new();
            for (title, expr) in &exprs {
                let v: Value = reqwest::Client::new()
                    .get(format!("http://{PROMETHEUS}/api/v1/query"))
                    .query(&[("query", expr)])
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .await
                    .map_err(|e| e.to_string())?;
                // A query that does not parse fails at once: waiting will not fix it.
                assert_eq!(v["status"], "success", "panel {title:?}: {expr}: {v}");
                if v["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                    empty.push(format!("{title}: {expr}"));
                }
            }
            if empty.is_empty() {
                Ok(())
            } else {
                Err(format!("no series yet for: {empty:#?}"))
            }
        },
    )
    .await;

    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
