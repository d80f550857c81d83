//! simq's job specs, validated by the real Nomad agent with realistic variables.
//! Needs the agents of `scripts/cluster.sh start`; `scripts/test.sh` runs it.

use simq_nomad::{hcl_variables, jobs, NomadClient};

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
    }
}
