//! `simq-indexer deploy`: the whole stack serving one built dg, on a running cluster.
//! The steps, each idempotent (a second run with the same dg changes nothing):
//!   1. the blob store (`--serve-blobs`: the `blobs` job serving the `--blobs` directory;
//!      else a store that already serves, e.g. the nodes' SeaweedFS);
//!   2. publish the dg (its shard files into the store, its manifest into Consul KV);
//!   3. the binaries, ONNX Runtime and the model's files into the store: every job fetches
//!      them by sha256 and checks them, so the same specs run on any node;
//!   4. the `embedder` job, then the shards' rollout under the rollout lock (canaries when
//!      another dg runs, flip, promote: `cluster::rollout_locked`), then the `balancer` job,
//!      each registered from the spec compiled into this binary (`jobs::run_job`);
//!   5. wait until at least `--balancers` balancers pass and every passing one routes with
//!      the dg.
//!
//! `scripts/deploy.sh` gathers the settings (environment, the node cluster's addresses)
//! and calls this. A module of the binary: it composes the subcommands' handlers.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use simq_indexer::blobs::BlobStore;
use simq_indexer::jobs::{run_job, Ran};

use crate::cli::DeployArgs;
use crate::cluster::{clients, locked, rollout_locked};

/// Put `file` into the blob store under its sha256 and return the sha256.
pub async fn put_blob(store: &BlobStore, file: &Path) -> anyhow::Result<String> {
    let sha = simq_contract::kv::sha256_file(file)
        .with_context(|| format!("reading {}", file.display()))?;
    store.put(file, &sha).await?;
    Ok(sha)
}

/// `name = "value"` pairs as an HCL map, for a spec variable of type map(string).
fn hcl_map<'a>(pairs: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let items: Vec<String> = pairs
        .into_iter()
        .map(|(k, v)| format!("{k:?} = {v:?}"))
        .collect();
    format!("{{{}}}", items.join(", "))
}

fn vars(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

pub async fn deploy(mut args: DeployArgs) -> anyhow::Result<()> {
    let (consul, nomad, layout) = clients(&args.rollout.cluster)?;
    let limit = Duration::from_secs(args.rollout.timeout_secs);
    let say = |line: &str| tracing::info!("{line}");
    let job = |spec: &'static str, vars: Vec<(String, String)>| {
        let nomad = nomad.clone();
        async move {
            match run_job(&nomad, spec, &vars, limit).await? {
                Ran::Unchanged { job, version } => {
                    say(&format!("{job} version {version} already runs"))
                }
                Ran::Deployed { job, version } => say(&format!("{job} version {version} deployed")),
            }
            anyhow::Ok(())
        }
    };
    let bin = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the directory of simq-indexer")?
            .to_path_buf(),
    };
    let binary = |name: &str| -> anyhow::Result<std::path::PathBuf> {
        let path = bin.join(name);
        anyhow::ensure!(
            path.is_file(),
            "{} is missing: build with cargo build --release (or give --bin-dir)",
            path.display()
        );
        Ok(path)
    };

    // 1. The blob store.
    let store = args.rollout.blobs.open()?;
    if args.serve_blobs {
        let dir = args
            .rollout
            .blobs
            .blobs
            .clone()
            .filter(|b| !b.starts_with("s3://"))
            .context("--serve-blobs serves a directory: give --blobs DIR")?;
        say(&format!("blob store: serving {dir}"));
        let indexer = binary("simq-indexer")?;
        job(
            "blobs",
            vars(&[("indexer_bin", indexer.display().to_string()), ("dir", dir)]),
        )
        .await?;
    }

    // 2. The dg.
    let published = simq_indexer::publish::publish(&args.dg_dir, &store, &consul, &layout).await?;
    let dg = published.dg.clone();
    say(&format!(
        "dg {dg} published: {} blobs added, {} already present",
        published.blobs_added, published.blobs_present
    ));

    // 3. What the jobs fetch.
    let model_dir = args
        .rollout
        .model_dir
        .clone()
        .context("give --model-dir: the model the embedders run")?;
    let (model_id, model_files) = simq_indexer::models::put_model(&model_dir, &store).await?;
    let embedder_sha = put_blob(&store, &binary("simq-embedder")?).await?;
    let ort_sha = put_blob(&store, &args.ort_lib)
        .await
        .context("--ort-lib (ORT_DYLIB_PATH)")?;
    let balancer_sha = put_blob(&store, &binary("simq-balancer")?).await?;
    let shard_bin = binary("simq-shard")?;
    // The exec driver's chroot has no host path: it needs the fetched binary too.
    if args.shard_bin_from_blobs || args.rollout.driver == "exec" {
        args.rollout.shard_bin_sha256 = Some(put_blob(&store, &shard_bin).await?);
    } else if args.rollout.shard_bin.is_none() {
        args.rollout.shard_bin = Some(shard_bin);
    }
    say(&format!(
        "binaries, ONNX Runtime and model {model_id} in the blob store"
    ));

    // 4. The jobs.
    let blob_url = args.rollout.blob_url.clone();
    let driver = args.rollout.driver.clone();
    say(&format!(
        "embedder: {} instance(s) of model {model_id}",
        args.embedders
    ));
    job(
        "embedder",
        vars(&[
            ("model_id", model_id.clone()),
            ("blob_url", blob_url.clone()),
            ("embedder_sha256", embedder_sha),
            ("ort_sha256", ort_sha),
            ("model_files", hcl_map(&model_files)),
            ("count", args.embedders.to_string()),
            ("driver", driver.clone()),
        ]),
    )
    .await?;
    say(&format!("shards of {dg}: rollout"));
    locked(
        &consul,
        &layout,
        rollout_locked(&consul, &nomad, &layout, dg.clone(), args.rollout, false),
    )
    .await?;
    let nprobe = args
        .nprobe
        .unwrap_or(simq_contract::defaults::NPROBE)
        .to_string();
    say(&format!(
        "balancer: {} instance(s) on port {}",
        args.balancers, args.port
    ));
    job(
        "balancer",
        vars(&[
            ("blob_url", blob_url),
            ("balancer_sha256", balancer_sha),
            ("driver", driver),
            ("embedder_order", args.embedder_order.clone()),
            ("port", args.port.to_string()),
            ("nprobe", nprobe),
            ("consul_wait_secs", args.consul_wait_secs.to_string()),
            ("count", args.balancers.to_string()),
            ("api_keys", args.api_keys.clone()),
            (
                "consul_token_file",
                args.balancer_token_file
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
        ]),
    )
    .await?;

    // 5. Ready: the balancers route with the dg.
    let waited = simq_indexer::rollout::wait_for_balancers(
        &consul,
        &dg,
        args.balancers,
        Duration::from_secs(args.ready_secs),
    )
    .await;
    anyhow::ensure!(
        waited.ready,
        "the balancers do not serve {dg} after {} s: {} (see nomad alloc logs)",
        args.ready_secs,
        waited.seen
    );
    say(&format!("serving {dg}: {}", waited.seen));
    println!("{dg}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_files_go_to_the_spec_as_an_hcl_map() {
        let files: std::collections::BTreeMap<String, String> = [
            ("model.onnx".to_string(), "aa".to_string()),
            ("tokenizer.json".to_string(), "bb".to_string()),
        ]
        .into();
        assert_eq!(
            hcl_map(&files),
            r#"{"model.onnx" = "aa", "tokenizer.json" = "bb"}"#
        );
    }
}
