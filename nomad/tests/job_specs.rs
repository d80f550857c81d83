//! simq's job specs, validated by the real Nomad agent with realistic variables.
//! Needs the agents of `scripts/cluster.sh start`; `scripts/test.sh` runs it.

use serde_json::Value;
use simq_contract::services::{self, tag};
use simq_nomad::{hcl_variables, jobs, NomadClient};

/// Every service a parsed job registers (group and task level): name and tags.
fn registered(job: &Value) -> Vec<(String, Vec<String>)> {
    let list = |v: &Value| -> Vec<Value> { v["Services"].as_array().cloned().unwrap_or_default() };
    let groups = job["TaskGroups"].as_array().cloned().unwrap_or_default();
    let tasks = groups
        .iter()
        .flat_map(|g| g["Tasks"].as_array().cloned().unwrap_or_default());
    groups
        .iter()
        .flat_map(list)
        .chain(tasks.flat_map(|t| list(&t)))
        .map(|s| {
            let tags = s["Tags"].as_array().cloned().unwrap_or_default();
            let tags = tags
                .iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect();
            (s["Name"].as_str().unwrap_or_default().to_string(), tags)
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs the local cluster: run scripts/test.sh"]
async fn every_job_spec_passes_nomad_validate() {
    let nomad = NomadClient::from_env().unwrap();
    let sha = "a".repeat(64);
    let shards_json =
        format!(r#"[{{"shard": 0, "sha256": "{sha}"}}, {{"shard": 1, "sha256": "{sha}"}}]"#);
    // The shards job with the variables every caller passes, plus `extra`.
    let shards_vars = |extra: [(&'static str, &str); 2], counts: &str| {
        hcl_variables(
            [
                ("dg", "dg-0123456789abcdef"),
                ("model_id", "model-1"),
                ("shards_json", shards_json.as_str()),
                ("blob_url", "http://127.0.0.1:8090"),
            ]
            .into_iter()
            .chain(extra),
        ) + counts
    };
    let cases: Vec<(&str, &str, String, usize)> = vec![
        // As simq-indexer rollout registers it on the single node (a host path).
        (
            "simq-shards",
            jobs::SHARDS,
            shards_vars(
                [("shard_bin", "/usr/local/bin/simq-shard"), ("driver", "raw_exec")],
                "dims = 384\nreplicas = 2\ncanary = 2\n",
            ),
            2,
        ),
        // As a node cluster runs it: the binary an artifact, the exec driver, replicas
        // apart (groups named after the dg).
        (
            "simq-shards",
            jobs::SHARDS,
            shards_vars(
                [("shard_bin_sha256", sha.as_str()), ("driver", "exec")],
                "dims = 384\nreplicas = 2\ncanary = 0\nreplicas_apart = true\n",
            ),
            2,
        ),
        (
            "simq-embedder",
            jobs::EMBEDDER,
            hcl_variables([
                ("model_id", "model-1"),
                ("blob_url", "http://127.0.0.1:8090"),
                ("embedder_sha256", sha.as_str()),
                ("ort_sha256", sha.as_str()),
            ]) + &format!(
                "model_files = {{ \"model.onnx\" = \"{sha}\", \"tokenizer.json\" = \"{sha}\", \"simq-model.json\" = \"{sha}\" }}\n"
            ),
            1,
        ),
        (
            "simq-balancer",
            jobs::BALANCER,
            hcl_variables([
                ("blob_url", "http://127.0.0.1:8090"),
                ("balancer_sha256", sha.as_str()),
                ("nprobe", "64"),
            ]),
            1,
        ),
        (
            "simq-blobs",
            jobs::BLOBS,
            hcl_variables([
                ("indexer_bin", "/usr/local/bin/simq-indexer"),
                ("dir", "/blobs"),
            ]),
            1,
        ),
    ];
    for (id, spec, vars, groups) in cases {
        let job = nomad
            .parse_job(spec, &vars)
            .await
            .unwrap_or_else(|e| panic!("{id} parses: {e}"));
        assert_eq!(job["ID"], id);
        assert_eq!(
            job["TaskGroups"].as_array().unwrap().len(),
            groups,
            "{id} groups"
        );
        nomad
            .validate_job(&job)
            .await
            .unwrap_or_else(|e| panic!("{id} validates: {e}"));
        // The specs register the names and tags simq-contract gives the balancer and
        // the indexer to look them up by.
        let (service, tags): (&str, &[&str]) = match id {
            "simq-shards" => (services::SHARD, &[tag::DG, tag::SHARD, tag::SHA256]),
            "simq-embedder" => (services::EMBEDDER, &[tag::MODEL]),
            "simq-balancer" => (services::BALANCER, &[]),
            _ => continue,
        };
        let found = registered(&job);
        let ours: Vec<_> = found.iter().filter(|(name, _)| name == service).collect();
        assert!(!ours.is_empty(), "{id} registers {service}: {found:?}");
        for (_, have) in ours {
            for t in tags {
                assert!(
                    have.iter().any(|h| h.starts_with(&format!("{t}="))),
                    "{id}'s {service} carries tag {t}=: {have:?}"
                );
            }
        }
    }
}
