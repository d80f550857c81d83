//! The embedder binary, for real: real model, real ONNX Runtime, real sockets (and its
//! runtime in process). Needs `scripts/setup.sh` (model and runtime); `scripts/test.sh`
//! runs these.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use simq_embedder::model::ModelDir;
use simq_embedder::proto::{embedder_client::EmbedderClient, EmbedRequest, InfoRequest};
use simq_testkit::{free_port, Service};

fn model_dir() -> std::path::PathBuf {
    std::env::var_os("SIMQ_MODEL_DIR")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/simq/models/minilm-l6-v2-int8")
        })
}

/// The second model (scripts/setup.sh model_b), for model rollouts.
fn model_b_dir() -> std::path::PathBuf {
    std::env::var_os("SIMQ_MODEL_B_DIR")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/simq/models/paraphrase-minilm-l3-v2")
        })
}

/// A running embedder (killed when dropped).
type Running = Service;

async fn start() -> Running {
    start_with(&[]).await
}

async fn start_with(extra: &[&str]) -> Running {
    start_model(&model_dir(), extra).await
}

/// Start the embedder on two free ports and wait until /health answers. A port found free
/// can be taken by a test running beside this one before the service binds it; the service
/// then exits ("Address already in use") and is started again on other ports.
async fn start_model(model: &std::path::Path, extra: &[&str]) -> Running {
    for _attempt in 0..3 {
        let mut command = Command::new(env!("CARGO_BIN_EXE_simq-embedder"));
        command
            .args(["--model-dir", model.to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut running = Service::spawn(command);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if reqwest::get(format!("{}/health", running.http))
                .await
                .is_ok()
            {
                return running;
            }
            if let Some(status) = running.child.try_wait().unwrap() {
                eprintln!("embedder exited at start ({status}); trying other ports");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "embedder did not answer /health within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    panic!("embedder exited at start three times (see its log above)");
}

/// The service's /health answer.
async fn health(server: &Running) -> serde_json::Value {
    reqwest::get(format!("{}/health", server.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The service's /metrics text.
async fn scrape(server: &Running) -> String {
    server.get_text("/metrics").await
}

/// The sum of every series of metric `name` (all label sets), and the whole scrape.
async fn metric_sum(server: &Running, name: &str) -> (f64, String) {
    let metrics = scrape(server).await;
    let sum = metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    (sum, metrics)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Two paraphrases and an unrelated question.
const TEXTS: [&str; 3] = [
    "How do I learn Rust quickly?",
    "What is the fastest way to learn Rust?",
    "Who won the football match last night?",
];

/// Embed [`TEXTS`] in one call and the last one alone (two calls); check that vectors are
/// L2-normalised, the paraphrases closer than the unrelated pair, and a vector the same
/// alone and in a batch. Returns (model id, the three vectors, paraphrase similarity).
async fn embeds_paraphrases_close(server: &Running) -> (String, Vec<Vec<f32>>, f32) {
    let mut client = EmbedderClient::connect(server.grpc.clone()).await.unwrap();
    let mut embed = async |texts: &[&str]| {
        client
            .embed(EmbedRequest {
                texts: texts.iter().map(|s| s.to_string()).collect(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    let resp = embed(&TEXTS).await;
    assert_eq!(resp.vectors.len(), 3 * 384);
    let rows: Vec<Vec<f32>> = resp.vectors.chunks(384).map(<[f32]>::to_vec).collect();
    for r in &rows {
        assert!((dot(r, r) - 1.0).abs() < 1e-3, "vectors are L2-normalised");
    }
    let (close, far) = (dot(&rows[0], &rows[1]), dot(&rows[0], &rows[2]));
    assert!(
        close > far + 0.3,
        "paraphrases close ({close}), unrelated far ({far})"
    );
    // Padding inside a batch must not change a vector, nor the layout: alone (on the lone
    // session with a thread per core) == in a batch (split over single-threaded sessions).
    let alone = embed(&TEXTS[2..]).await;
    assert_eq!(alone.model_id, resp.model_id);
    assert!(
        dot(&alone.vectors, &rows[2]) > 0.9999,
        "batched and single embeddings agree"
    );
    (resp.model_id, rows, close)
}

#[tokio::test]
#[ignore = "needs the model and ONNX Runtime from scripts/setup.sh: run scripts/test.sh"]
async fn the_second_model_serves_its_own_vectors_under_its_own_id() {
    // paraphrase-MiniLM-L3-v2: its graph takes no token_type_ids and names its output
    // "onnx::Shape_422"; the runtime finds both out from the graph and the manifest.
    let b = start_model(&model_b_dir(), &[]).await;
    let (id_b, rows_b, _) = embeds_paraphrases_close(&b).await;
    assert!(id_b.starts_with("paraphrase-MiniLM-L3-v2-"), "{id_b}");
    assert_eq!(id_b, ModelDir::open(&model_b_dir()).unwrap().model_id);
    drop(b);

    // Another model: another id and other vectors for the same text.
    let a = start().await;
    let (id_a, rows_a, _) = embeds_paraphrases_close(&a).await;
    assert_ne!(id_a, id_b);
    let same_text = dot(&rows_a[0], &rows_b[0]);
    assert!(
        same_text < 0.99,
        "the two models' vectors differ: {same_text}"
    );
}

#[test]
#[ignore = "needs the model and ONNX Runtime from scripts/setup.sh: run scripts/test.sh"]
fn a_request_tokenised_on_its_own_thread_gets_the_tokens_of_the_parallel_path() {
    use simq_embedder::runtime::{default_ort_library, Embedder, RuntimeOptions};
    let embedder = Embedder::load(
        &default_ort_library(),
        &model_dir(),
        RuntimeOptions::for_queries(),
    )
    .unwrap();
    let long = "why ".repeat(400);
    let mut texts: Vec<String> = (0..200)
        .map(|i| format!("Question {i}: how do I café-proof my Übergrößen naïve résumé?"))
        .collect();
    texts.push(long);
    texts.push(String::new());
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    // A call this large goes to rayon's pool (an index build); one text stays on its thread.
    let together = embedder.tokenize(&refs).unwrap();
    let alone: Vec<_> = refs
        .iter()
        .flat_map(|t| embedder.tokenize(&[t]).unwrap())
        .collect();
    assert_eq!(together.len(), texts.len());
    assert_eq!(together, alone);
    let max = ModelDir::open(&model_dir()).unwrap().manifest.max_tokens;
    assert_eq!(
        together[200].ids.len(),
        max,
        "the long text is truncated the same way"
    );
}

#[test]
#[ignore = "needs the model and ONNX Runtime from scripts/setup.sh: run scripts/test.sh"]
fn a_model_manifest_naming_an_output_the_graph_lacks_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for file in ["model.onnx", "tokenizer.json"] {
        std::os::unix::fs::symlink(model_b_dir().join(file), dir.path().join(file)).unwrap();
    }
    let manifest = std::fs::read_to_string(model_b_dir().join("simq-model.json")).unwrap();
    let manifest = manifest.replace("onnx::Shape_422", "last_hidden_state");
    std::fs::write(dir.path().join("simq-model.json"), manifest).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_simq-embedder"))
        .args(["--model-dir", dir.path().to_str().unwrap()])
        .args(["--grpc-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--http-listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("no output \"last_hidden_state\"") && said.contains("onnx::Shape_422"),
        "{said}"
    );
}

#[tokio::test]
#[ignore = "needs the model and ONNX Runtime from scripts/setup.sh: run scripts/test.sh"]
async fn grpc_roundtrip_embeds_similar_texts_close_and_reports_model_id() {
    let server = start().await;
    let expected_id = ModelDir::open(&model_dir()).unwrap().model_id;
    let mut client = EmbedderClient::connect(server.grpc.clone()).await.unwrap();

    let info = client.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_id, expected_id);
    assert_eq!(info.dims, 384);

    let (id, _, close) = embeds_paraphrases_close(&server).await;
    assert_eq!(id, expected_id);
    assert!(close > 0.7, "paraphrases close: {close}");

    // Bad input: a clear INVALID_ARGUMENT naming the problem.
    let err = client
        .embed(EmbedRequest { texts: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("texts is empty"),
        "{}",
        err.message()
    );
    let err = client
        .embed(EmbedRequest {
            texts: vec!["x".repeat(10_000)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("texts[0] has 10000 bytes"),
        "{}",
        err.message()
    );

    let health = health(&server).await;
    assert_eq!(health["model_id"], expected_id);
    let metrics = scrape(&server).await;
    assert!(
        metrics.contains("simq_embedder_requests_total{outcome=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("simq_embedder_requests_total{outcome=\"invalid\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("simq_embedder_inference_seconds_count"));
}

#[tokio::test]
#[ignore = "needs the model and ONNX Runtime from scripts/setup.sh: run scripts/test.sh"]
async fn concurrent_requests_share_batches_and_sigterm_stops_cleanly() {
    let mut server = start().await;
    let client = EmbedderClient::connect(server.grpc.clone()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            c.embed(EmbedRequest {
                texts: vec![format!("question number {i} about batching")],
            })
            .await
            .map(|r| r.into_inner().vectors.len())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 384);
    }
    let (batches, _) = metric_sum(&server, "simq_embedder_batch_texts_count").await;
    assert!(
        batches < 64.0,
        "64 concurrent requests ran in {batches} batches: some must share"
    );

    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "clean exit on SIGTERM, got {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "embedder did not stop within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
#[ignore = "needs the model and ONNX Runtime from scripts/setup.sh: run scripts/test.sh"]
async fn cancelled_calls_give_their_queue_slots_back_and_overload_never_wedges() {
    // One text per batch on one session: queued work waits its turn long enough for
    // callers to leave.
    let server = start_with(&[
        "--queue-limit",
        "64",
        "--max-batch-texts",
        "1",
        "--sessions",
        "1",
    ])
    .await;
    let channel = tonic::transport::Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // 300 long texts at once, each caller giving up after 300 ms (grpc-timeout): the
    // queue takes up to 64 (the rest are refused at once), far more than the service embeds
    // one at a time in 300 ms, so the later ones are cancelled while queued. (With 30 ms
    // and batches of 16, as before, on a busy machine the calls expired before they reached
    // the queue or while their batch ran, and the test saw nothing to skip.)
    let long =
        "why did the old lighthouse keeper decide to leave the island after the storm ".repeat(8);
    let calls = (0..300).map(|i| {
        let mut client = EmbedderClient::new(channel.clone());
        let text = format!("{i} {long}");
        async move {
            let mut req = tonic::Request::new(EmbedRequest { texts: vec![text] });
            req.set_timeout(Duration::from_millis(300));
            client.embed(req).await.map(|_| ()).map_err(|s| s.code())
        }
    });
    let outcomes = futures::future::join_all(calls).await;
    let refused = outcomes.iter().filter(|o| o.is_err()).count();
    assert!(
        refused > 200,
        "most calls should time out or be refused: {refused} of 300"
    );

    // Within 5 s every slot is back and queued work of gone callers was skipped.
    // (Slots come back when the callers go; their jobs are skipped when the collector
    // reaches them, a moment later: both are waited for.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let health = health(&server).await;
        let (skipped, metrics) = metric_sum(&server, "simq_embedder_skipped_requests_total").await;
        if health["queued_texts"] == 0 && health["status"] == "ok" && skipped > 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "queue did not drain ({health}) or work of callers that left was computed anyway:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // And within 5 s of the end a normal query answers at normal speed (a batch that
    // started before its callers left may still finish first).
    let mut client = EmbedderClient::new(channel);
    let ended = Instant::now();
    loop {
        let started = Instant::now();
        let answer = client
            .embed(EmbedRequest {
                texts: vec!["How long did the war last?".into()],
            })
            .await;
        if answer.is_ok() && started.elapsed() < Duration::from_millis(100) {
            break;
        }
        assert!(
            ended.elapsed() < Duration::from_secs(5),
            "not back to normal within 5 s: {:?} after {:?}",
            answer.err(),
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
