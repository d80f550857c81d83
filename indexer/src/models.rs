//! Embedders per model. A dg names the model that made its vectors, and balancers pair it
//! only with embedders registered with that model's tag, so a dg of another model can go
//! live only while embedders of its model run. There is one embedder job per model:
//! `simq-embedder` (from scripts/deploy.sh) for the first, `simq-embedder-<model id>` for
//! each model a rollout brings in. A rollout to a dg of another model starts that model's
//! job beside the running one and waits until its instances pass, before any shard
//! moves ([`ensure_for`]); once the flip is done and the old shards went, the jobs of
//! models the active dg does not use stop ([`retire_unused`]). They are stopped, not
//! purged: `rollback` starts them again the same way.
//!
//! A new model's job fetches its files like the first one: as checksummed artifacts from
//! the blob store (the rollout puts them there first), so it runs on any node.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use simq_consul::ConsulClient;
use simq_contract::services::{self, tag, tag_value};
use simq_contract::KvLayout;
use simq_nomad::NomadClient;

use crate::blobs::BlobStore;

/// Job ids of embedder jobs start with this.
pub const JOB_PREFIX: &str = "simq-embedder";

/// The job id for `model_id`'s embedders, when a rollout creates it.
pub fn job_id(model_id: &str) -> String {
    format!("{JOB_PREFIX}-{model_id}")
}

/// The model of an embedder job: the `model=` tag of its service.
pub fn model_of(job: &Value) -> Option<String> {
    job["TaskGroups"]
        .as_array()?
        .iter()
        .flat_map(|g| g["Services"].as_array().into_iter().flatten())
        .flat_map(|s| s["Tags"].as_array().into_iter().flatten())
        .find_map(|t| services::value_of(t.as_str()?, tag::MODEL).map(String::from))
}

/// Where an embedder task's artifacts put the model's files (`nomad/embedder.nomad.hcl`:
/// `local/model/<file name>`, which the task runs as its `--model-dir`).
const MODEL_DEST: &str = "local/model/";

/// The model files an embedder job fetches: file name -> sha256 (from its artifacts'
/// checksums).
pub fn model_files_of(job: &Value) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for task in job["TaskGroups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["Tasks"].as_array().into_iter().flatten())
    {
        for a in task["Artifacts"].as_array().into_iter().flatten() {
            let name = a["RelativeDest"]
                .as_str()
                .and_then(|d| d.strip_prefix(MODEL_DEST));
            let sha = a["GetterOptions"]["checksum"]
                .as_str()
                .and_then(|c| c.strip_prefix("sha256:"));
            if let (Some(name), Some(sha)) = (name, sha) {
                files.insert(name.to_string(), sha.to_string());
            }
        }
    }
    files
}

/// A new model's embedder job, made from a running one's: the same binaries, counts,
/// checks and update rules, with the model id replaced everywhere (service tag,
/// arguments), each model file's artifact pointed at the new model's blob of that name
/// (`files`: name -> sha256, every file the template fetches and no other), and a job id
/// of its own.
pub fn job_for_model(
    template: &Value,
    model_id: &str,
    files: &BTreeMap<String, String>,
) -> anyhow::Result<Value> {
    let old_model =
        model_of(template).ok_or_else(|| anyhow!("the embedder job has no model= tag"))?;
    let fetched = model_files_of(template);
    if fetched.is_empty() {
        bail!("the embedder job fetches no model files as artifacts (into {MODEL_DEST})");
    }
    if !fetched.keys().eq(files.keys()) {
        bail!(
            "the embedder job fetches the model files {:?}, the new model has {:?}",
            fetched.keys().collect::<Vec<_>>(),
            files.keys().collect::<Vec<_>>()
        );
    }
    fn replace(v: &mut Value, from: &[(&str, &str)]) {
        match v {
            Value::String(s) => {
                for (a, b) in from {
                    if s.contains(a) {
                        *s = s.replace(a, b);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| replace(i, from)),
            Value::Object(members) => members.values_mut().for_each(|m| replace(m, from)),
            _ => {}
        }
    }
    let mut job = template.clone();
    replace(&mut job, &[(old_model.as_str(), model_id)]);
    for (name, old) in &fetched {
        let new = &files[name];
        replace(&mut job, &[(old.as_str(), new.as_str())]);
    }
    let id = job_id(model_id);
    let members = job
        .as_object_mut()
        .ok_or_else(|| anyhow!("the embedder job is not a JSON object"))?;
    // What Nomad keeps about the template's own history does not carry over.
    for key in [
        "Status",
        "StatusDescription",
        "Version",
        "CreateIndex",
        "ModifyIndex",
        "JobModifyIndex",
        "SubmitTime",
        "Stable",
        "ParentID",
    ] {
        members.remove(key);
    }
    members.insert("ID".into(), id.clone().into());
    members.insert("Name".into(), id.into());
    members.insert("Stop".into(), false.into());
    Ok(job)
}

/// Every embedder job Nomad knows (running or stopped), with its model.
async fn embedder_jobs(
    nomad: &NomadClient,
) -> anyhow::Result<Vec<(String, Value, Option<String>)>> {
    let mut jobs = Vec::new();
    for stub in nomad.list_jobs().await? {
        if !stub.id.starts_with(JOB_PREFIX) {
            continue;
        }
        if let Some(job) = nomad.job(&stub.id).await? {
            let model = model_of(&job);
            jobs.push((stub.id, job, model));
        }
    }
    Ok(jobs)
}

/// Passing embedders of `model_id`.
async fn passing(consul: &ConsulClient, model_id: &str) -> anyhow::Result<usize> {
    Ok(consul
        .health_service(services::EMBEDDER, true, None)
        .await?
        .value
        .iter()
        .filter(|e| tag_value(&e.tags, tag::MODEL) == Some(model_id))
        .count())
}

fn is_stopped(job: &Value) -> bool {
    job["Stop"].as_bool() == Some(true)
}

/// Make sure embedders of `model_id` run and pass: nothing to do when some already pass; a
/// stopped job of that model is started again; otherwise the files of `model_dir` (which
/// must hold that model) go into `blobs`, and a new job is made from a running embedder
/// job that fetches them.
pub async fn ensure_for(
    nomad: &NomadClient,
    consul: &ConsulClient,
    model_id: &str,
    model_dir: Option<&Path>,
    blobs: Option<&BlobStore>,
    progress: &impl Fn(&str),
) -> anyhow::Result<()> {
    if passing(consul, model_id).await? > 0 {
        return Ok(());
    }
    let jobs = embedder_jobs(nomad).await?;
    let own = jobs.iter().find(|(_, _, m)| m.as_deref() == Some(model_id));
    let job = match own {
        Some((id, job, _)) => {
            progress(&format!(
                "no embedder of model {model_id} passes: starting job {id} again"
            ));
            let mut job = job.clone();
            job["Stop"] = false.into();
            job
        }
        None => {
            let dir = model_dir.ok_or_else(|| {
                anyhow!(
                    "this dg was built with model {model_id}, and no embedder of it runs or ran here; \
                     give --model-dir DIR, the directory of that model (e.g. scripts/setup.sh model_b installs one)"
                )
            })?;
            let blobs = blobs.ok_or_else(|| {
                anyhow!(
                    "a model rollout puts the model's files into the blob store the jobs fetch \
                     from: give --blobs (a directory, scripts/up.sh's is ~/.cache/simq/blobs, or \
                     s3://BUCKET)"
                )
            })?;
            let (dir_model, files) = put_model(dir, blobs).await?;
            if dir_model != model_id {
                bail!(
                    "--model-dir {} holds model {dir_model}, but the dg was built with {model_id}",
                    dir.display(),
                );
            }
            progress(&format!(
                "model {model_id}: {} files in the blob store",
                files.len()
            ));
            let template = jobs
                .iter()
                .find(|(_, j, _)| !is_stopped(j))
                .or(jobs.first())
                .ok_or_else(|| {
                    anyhow!("no embedder job to copy: deploy the stack first (scripts/deploy.sh)")
                })?;
            progress(&format!(
                "starting embedders of model {model_id} (job {}, copied from {}) beside the running ones",
                job_id(model_id),
                template.0
            ));
            job_for_model(&template.1, model_id, &files)?
        }
    };
    nomad
        .register_job(&job)
        .await
        .context("registering the embedder job")?;
    let want = job["TaskGroups"][0]["Count"].as_u64().unwrap_or(1).max(1) as usize;
    let report = |n: usize, waited: Duration| {
        progress(&format!(
            "embedders of model {model_id}: {n}/{want} pass ({:.0} s)",
            waited.as_secs_f64()
        ))
    };
    let limit = Duration::from_secs(180);
    if let Err(n) = poll_passing(consul, model_id, limit, |n| n >= want, report).await? {
        bail!(
            "embedders of model {model_id}: only {n} of {want} pass after {} s; see `nomad job status {}`",
            limit.as_secs(),
            job["ID"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

/// Poll the passing embedders of `model_id` every 500 ms until `done(count)`, for at most
/// `limit`: the time it took, or `Err(last count)`. Each new count goes to `on_count`.
/// Put a model directory's files (each checked against the model's manifest by
/// `ModelDir::open`) and the manifest itself into the blob store; returns the model id
/// and each file's name with its sha256, as the embedder job fetches them.
pub async fn put_model(
    dir: &Path,
    blobs: &BlobStore,
) -> anyhow::Result<(String, BTreeMap<String, String>)> {
    let model = simq_embedder::model::ModelDir::open(dir)
        .with_context(|| format!("--model-dir {}", dir.display()))?;
    let mut files = model.manifest.files.clone();
    let manifest = dir.join(simq_embedder::model::MANIFEST_FILE);
    files.insert(
        simq_embedder::model::MANIFEST_FILE.to_string(),
        simq_contract::kv::sha256_file(&manifest)
            .with_context(|| format!("reading {}", manifest.display()))?,
    );
    for (name, sha) in &files {
        blobs.put(&dir.join(name), sha).await?;
    }
    Ok((model.model_id, files.into_iter().collect()))
}

async fn poll_passing(
    consul: &ConsulClient,
    model_id: &str,
    limit: Duration,
    done: impl Fn(usize) -> bool,
    mut on_count: impl FnMut(usize, Duration),
) -> anyhow::Result<Result<Duration, usize>> {
    let started = Instant::now();
    let mut last = None;
    loop {
        let n = passing(consul, model_id).await?;
        if last != Some(n) {
            on_count(n, started.elapsed());
            last = Some(n);
        }
        if done(n) {
            return Ok(Ok(started.elapsed()));
        }
        if started.elapsed() > limit {
            return Ok(Err(n));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// [`ensure_for`] the model of the published dg `dg`.
pub async fn ensure_for_dg(
    nomad: &NomadClient,
    consul: &ConsulClient,
    layout: &KvLayout,
    dg: &str,
    model_dir: Option<&Path>,
    blobs: Option<&BlobStore>,
    progress: &impl Fn(&str),
) -> anyhow::Result<()> {
    let model = crate::rollout::published_manifest(consul, layout, dg)
        .await?
        .model_id;
    ensure_for(nomad, consul, &model, model_dir, blobs, progress).await
}

/// Whether an embedder job of `job_model` is to stop: it runs and serves none of the
/// models still in use.
fn unused(job_model: Option<&str>, stopped: bool, in_use: &[String]) -> bool {
    !stopped && !job_model.is_some_and(|m| in_use.iter().any(|u| u == m))
}

/// The candidate dg that still runs beside the active one after a rollout failed: the one
/// that ran before it (`rollout --candidate-only`), if the shards job still serves it, i.e.
/// the failed rollout never replaced it.
pub fn surviving_candidate<'a>(before: Option<&'a str>, now: Option<&str>) -> Option<&'a str> {
    before.filter(|b| now == Some(*b))
}

/// Stop the embedder jobs of every model that neither the active dg, nor the candidate of a
/// traffic split, nor `running_candidate` (a dg whose canaries still run beside the active
/// one) uses; the jobs stay known to Nomad, so `rollback` can start them again. Called
/// after a flip, and after a rollout failed or a candidate was aborted, so that a new
/// model's embedders do not outlive the dg they were started for.
pub async fn retire_unused(
    nomad: &NomadClient,
    consul: &ConsulClient,
    layout: &KvLayout,
    running_candidate: Option<&str>,
    progress: &impl Fn(&str),
) -> anyhow::Result<()> {
    let Some(active) = crate::flip::observe(consul, layout).await?.active else {
        return Ok(());
    };
    // The dgs still served or about to be, each once (a running candidate is often the
    // active dg itself); their models stay.
    let split = crate::traffic::observe(consul, layout).await?.split;
    let mut dgs: Vec<&str> = vec![&active.dg];
    let others = [
        split
            .as_ref()
            .and_then(|s| s.as_ref().ok())
            .map(|s| s.candidate.as_str()),
        running_candidate,
    ];
    for dg in others.into_iter().flatten() {
        if !dgs.contains(&dg) {
            dgs.push(dg);
        }
    }
    let mut in_use = Vec::with_capacity(dgs.len());
    for dg in dgs {
        in_use.push(
            crate::rollout::published_manifest(consul, layout, dg)
                .await?
                .model_id,
        );
    }
    let model = &in_use[0];
    for (id, job, job_model) in embedder_jobs(nomad).await? {
        if !unused(job_model.as_deref(), is_stopped(&job), &in_use) {
            continue;
        }
        progress(&format!(
            "embedders of model {} (job {id}) stop: the active dg {} uses {model}",
            job_model.as_deref().unwrap_or("?"),
            active.dg
        ));
        nomad.stop_job(&id, false).await?;
        // Done when Consul lists none of them any more (each leaves before it stops).
        if let Some(m) = &job_model {
            let limit = Duration::from_secs(60);
            match poll_passing(consul, m, limit, |n| n == 0, |_, _| {}).await? {
                Ok(took) => progress(&format!(
                    "embedders of model {m} stopped ({:.1} s)",
                    took.as_secs_f64()
                )),
                Err(_) => bail!(
                    "embedders of model {m} still pass {} s after job {id} was stopped",
                    limit.as_secs()
                ),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn template() -> Value {
        json!({
            "ID": "simq-embedder", "Name": "simq-embedder", "Version": 3, "Status": "running",
            "TaskGroups": [{
                "Name": "embedder", "Count": 2,
                "Services": [{"Name": "simq-embedder", "Tags": ["model=model-a-123"]}],
                "Tasks": [{"Name": "embedder",
                    "Config": {"command": "local/simq-embedder",
                        "args": ["--model-dir", "${NOMAD_TASK_DIR}/model", "--ort-library",
                            "${NOMAD_TASK_DIR}/ort/libonnxruntime.so"]},
                    "Artifacts": [
                        artifact("aaa1", "local/simq-embedder"),
                        artifact("0001", "local/model/model.onnx"),
                        artifact("0002", "local/model/tokenizer.json"),
                        artifact("0003", "local/model/simq-model.json"),
                    ]}]
            }]
        })
    }

    fn artifact(sha: &str, dest: &str) -> Value {
        json!({"GetterSource": format!("http://127.0.0.1:8333/simq-blobs/{sha}"),
            "GetterOptions": {"checksum": format!("sha256:{sha}")},
            "GetterMode": "file", "RelativeDest": dest})
    }

    fn files(shas: [&str; 3]) -> BTreeMap<String, String> {
        ["model.onnx", "tokenizer.json", "simq-model.json"]
            .into_iter()
            .zip(shas)
            .map(|(n, s)| (n.to_string(), s.to_string()))
            .collect()
    }

    #[test]
    fn a_model_and_its_files_are_read_from_the_job() {
        assert_eq!(model_of(&template()).as_deref(), Some("model-a-123"));
        assert_eq!(model_files_of(&template()), files(["0001", "0002", "0003"]));
        assert_eq!(model_of(&json!({"TaskGroups": []})), None);
    }

    #[test]
    fn a_new_model_job_replaces_the_model_and_its_files_only() {
        let new = files(["b001", "b002", "b003"]);
        let job = job_for_model(&template(), "model-b-456", &new).unwrap();
        assert_eq!(job["ID"], "simq-embedder-model-b-456");
        assert_eq!(job["Name"], "simq-embedder-model-b-456");
        assert_eq!(model_of(&job).as_deref(), Some("model-b-456"));
        assert_eq!(model_files_of(&job), new);
        let task = &job["TaskGroups"][0]["Tasks"][0];
        assert_eq!(
            task["Artifacts"][1]["GetterSource"], "http://127.0.0.1:8333/simq-blobs/b001",
            "fetched from the same store"
        );
        assert_eq!(
            task["Artifacts"][0],
            template()["TaskGroups"][0]["Tasks"][0]["Artifacts"][0],
            "the binary is kept"
        );
        assert_eq!(task["Config"]["args"][1], "${NOMAD_TASK_DIR}/model");
        assert_eq!(job["TaskGroups"][0]["Count"], 2);
        assert!(job.get("Version").is_none() && job.get("Status").is_none());
        assert_eq!(job["Stop"], false);
    }

    #[test]
    fn a_new_model_must_bring_every_file_the_job_fetches() {
        let mut two = files(["b001", "b002", "b003"]);
        two.remove("tokenizer.json");
        let err = job_for_model(&template(), "model-b-456", &two)
            .unwrap_err()
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        let mut bare = template();
        bare["TaskGroups"][0]["Tasks"][0]["Artifacts"] = json!([]);
        let err = job_for_model(&bare, "model-b-456", &files(["1", "2", "3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("fetches no model files"), "{err}");
    }

    #[test]
    fn embedders_stop_only_when_they_run_a_model_nothing_uses() {
        let in_use = ["model-a".to_string(), "model-b".to_string()];
        assert!(
            !unused(Some("model-a"), false, &in_use),
            "the active dg's model"
        );
        assert!(
            !unused(Some("model-b"), false, &in_use),
            "the candidate's model"
        );
        assert!(unused(Some("model-c"), false, &in_use));
        assert!(!unused(Some("model-c"), true, &in_use), "already stopped");
        assert!(
            unused(None, false, &in_use),
            "a job without a model serves none"
        );
        assert!(
            unused(Some("model-b"), false, &in_use[..1]),
            "no split: b is unused"
        );
    }

    #[test]
    fn a_candidate_survives_a_failed_rollout_only_if_its_shards_still_run() {
        // `rollout --candidate-only` left c beside the active dg; the next rollout failed
        // before registering its shards job: c's canaries run on, so does its model.
        assert_eq!(
            surviving_candidate(Some("dg-c"), Some("dg-c")),
            Some("dg-c")
        );
        // The failed rollout had replaced c's canaries (now its own or the reverted job's).
        assert_eq!(surviving_candidate(Some("dg-c"), Some("dg-x")), None);
        assert_eq!(surviving_candidate(Some("dg-c"), None), None);
        assert_eq!(surviving_candidate(None, Some("dg-x")), None);
    }
}
