//! A new embedding model rolls out like any dg, and back: a dg built with the second
//! model (paraphrase-MiniLM-L3-v2, scripts/setup.sh model_b) replaces one of the default
//! model under query load. The rollout starts that model's embedders beside the running
//! ones, then the dg's shards as canaries, flips once, and only then stops the old model's
//! embedders; `rollback` starts them again and flips back; a candidate of that model that
//! is aborted takes its embedders with it. All real: Consul, Nomad, both
//! models, LMDB shards. Needs the cluster (scripts/test.sh starts it and runs this).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{
    build_and_publish_with, cache_dir, corpus_slice, deploy, indexer, start_load, stop_jobs, Pace,
};
use simq_consul::ConsulClient;
use simq_contract::KvLayout;

/// The blob store the jobs fetch from, where a model rollout puts the new model's files.
fn blobs() -> String {
    cache_dir().join("blobs").to_string_lossy().into_owned()
}

fn model_b_dir() -> String {
    std::env::var("SIMQ_MODEL_B_DIR").expect("SIMQ_MODEL_B_DIR (scripts/test.sh sets it)")
}

/// Passing embedders of each model: (model a, model b).
async fn embedders(consul: &ConsulClient, a: &str, b: &str) -> (usize, usize) {
    let entries = consul
        .health_service("simq-embedder", true, None)
        .await
        .unwrap()
        .value;
    let of = |m: &str| {
        let tag = format!("model={m}");
        entries.iter().filter(|e| e.tags.contains(&tag)).count()
    };
    (of(a), of(b))
}

async fn model_of(consul: &ConsulClient, dg: &str) -> String {
    simq_indexer::rollout::published_manifest(consul, &KvLayout::default(), dg)
        .await
        .unwrap()
        .model_id
}

async fn run(args: Vec<String>) -> String {
    let shown = args.clone();
    let out = tokio::task::spawn_blocking(move || {
        indexer(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("simq-indexer {shown:?}:\n{said}");
    assert!(out.status.success(), "{said}");
    said
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster, both models and the corpus: run scripts/test.sh"]
async fn a_dg_of_another_model_rolls_out_and_back_under_load_without_a_failed_or_mixed_answer() {
    let tmp = tempfile::tempdir().unwrap();
    let consul = ConsulClient::from_env().unwrap();
    // The same 2000 questions indexed by either model; the load asks each of them once,
    // so every answer's first result is the question itself when the query was embedded by
    // the model of the dg that answered, and far from it when the models were mixed.
    let (corpus, texts) = corpus_slice(tmp.path(), "corpus.txt", 0..2000);
    let c = corpus.clone();
    let dg_a = tokio::task::spawn_blocking(move || deploy(&c, 4, 1, 8))
        .await
        .unwrap();
    let out = tmp.path().join("dgs");
    let dir_b = model_b_dir();
    let (dg_b, _) = tokio::task::spawn_blocking(move || {
        build_and_publish_with(&corpus, &out, 4, &["--model-dir", &dir_b])
    })
    .await
    .unwrap();
    let (model_a, model_b) = (
        model_of(&consul, &dg_a).await,
        model_of(&consul, &dg_b).await,
    );
    assert_ne!(model_a, model_b);
    assert_eq!(embedders(&consul, &model_a, &model_b).await, (2, 0));

    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(texts.clone(), texts.len(), Pace::Rate(8.0), stop.clone());

    // Without the model's directory the rollout refuses before anything moves.
    let refused = tokio::task::spawn_blocking({
        let dg_b = dg_b.clone();
        move || indexer(&["rollout", &dg_b])
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("--model-dir") && said.contains(&model_b),
        "{said}"
    );
    // With the model but no blob store to put its files in, too.
    let refused = tokio::task::spawn_blocking({
        let dg_b = dg_b.clone();
        move || indexer(&["rollout", &dg_b, "--model-dir", &model_b_dir()])
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("give --blobs"),
        "{said}"
    );

    let said = run(vec![
        "rollout".into(),
        dg_b.clone(),
        "--model-dir".into(),
        model_b_dir(),
        "--blobs".into(),
        blobs(),
    ])
    .await;
    assert!(
        said.contains(&format!("starting embedders of model {model_b}")),
        "{said}"
    );
    assert!(
        said.contains(&format!("embedders of model {model_a}")),
        "{said}"
    );
    let flip_at = said.find("active dg flipped").expect("a flip");
    let stop_at = said
        .find("stop: the active dg")
        .expect("old embedders stopped");
    assert!(
        flip_at < stop_at,
        "the old model's embedders stop after the flip: {said}"
    );
    assert_eq!(embedders(&consul, &model_a, &model_b).await, (0, 2));

    let said = run(vec!["rollback".into()]).await;
    assert!(said.contains("starting job simq-embedder again"), "{said}");
    assert_eq!(embedders(&consul, &model_a, &model_b).await, (2, 0));

    // A candidate of the other model gets its embedders; aborting it stops them again
    // (they used to outlive a candidate that never became active).
    run(vec![
        "rollout".into(),
        dg_b.clone(),
        "--model-dir".into(),
        model_b_dir(),
        "--blobs".into(),
        blobs(),
        "--candidate-only".into(),
    ])
    .await;
    assert_eq!(embedders(&consul, &model_a, &model_b).await, (2, 2));
    let said = run(vec!["abort".into()]).await;
    assert!(
        said.contains(&format!("embedders of model {model_b} stopped")),
        "{said}"
    );
    assert_eq!(embedders(&consul, &model_a, &model_b).await, (2, 0));

    stop.store(true, Ordering::Relaxed);
    let report = load.await.unwrap();
    report.assert_clean("a model rollout and its rollback under 8 unique queries/s");
    assert!(
        report.dgs.contains(&dg_a) && report.dgs.contains(&dg_b),
        "both dgs answered"
    );
    assert!(report.dgs.iter().all(|d| *d == dg_a || *d == dg_b));
    let worst = report.top_scores.iter().copied().fold(1.0, f64::min);
    assert!(
        worst > 0.95,
        "an answer whose query and dg came from different models (top score {worst})"
    );
    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}
