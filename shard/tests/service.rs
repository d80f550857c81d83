//! The shard binary, for real: a real LMDB shard file, a real process, real sockets.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use simq_shard::proto::{shard_client::ShardClient, InfoRequest, SearchRequest};
use simq_shard::{build_shard, BuildParams, ClusterItems, Item};
use simq_testkit::Service;

const DIMS: usize = 32;

fn unit_vectors(n: usize) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(11);
    (0..n)
        .map(|_| {
            let mut v: Vec<f32> = (0..DIMS).map(|_| rng.random::<f32>() - 0.5).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            v
        })
        .collect()
}

/// A shard file of 300 items (ids 500..800) in clusters 4 (first half) and 5, and its
/// sha256.
fn shard_file(dir: &Path, vectors: &[Vec<f32>]) -> (PathBuf, String) {
    let texts: Vec<String> = (0..vectors.len())
        .map(|i| format!("stored question {i}"))
        .collect();
    let mut clusters = vec![
        ClusterItems {
            id: 4,
            items: Vec::new(),
        },
        ClusterItems {
            id: 5,
            items: Vec::new(),
        },
    ];
    for (i, v) in vectors.iter().enumerate() {
        clusters[usize::from(i >= vectors.len() / 2)]
            .items
            .push(Item {
                id: 500 + i as u32,
                text: &texts[i],
                vector: v,
            });
    }
    let path = dir.join("shard-1.lmdb");
    build_shard(
        &path,
        1,
        DIMS,
        "model-a",
        &clusters,
        BuildParams { seed: 3 },
        None,
    )
    .unwrap();
    let sha = simq_contract::kv::sha256_file(&path).unwrap();
    (path, sha)
}

/// A running shard (killed when dropped).
type Shard = Service;

fn spawn(file: &Path, sha: &str, model: &str, dims: usize) -> Shard {
    let mut command = Command::new(env!("CARGO_BIN_EXE_simq-shard"));
    command
        .args([
            "--file",
            file.to_str().unwrap(),
            "--sha256",
            sha,
            "--dg",
            "dg-test",
            "--shard",
            "1",
        ])
        .args(["--model-id", model, "--dims", &dims.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Service::spawn(command)
}

async fn wait_healthy(s: &Shard) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("{}/health", s.http)).await {
            if r.status().is_success() {
                return r.json().await.unwrap();
            }
        }
        assert!(Instant::now() < deadline, "shard not healthy within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process must exit with status 2, naming `reason` on stderr.
fn assert_refuses(mut s: Shard, reason: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "shard kept running on a file it must refuse"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(s.child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(reason),
        "stderr names the cause ({reason}): {err}"
    );
}

#[tokio::test]
async fn verified_shard_serves_search_and_refuses_other_dgs_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = unit_vectors(300);
    let (file, sha) = shard_file(dir.path(), &vectors);
    let shard = spawn(&file, &sha, "model-a", DIMS);
    let health = wait_healthy(&shard).await;
    assert_eq!(health["items"], 300);
    assert_eq!(health["self_test"]["found"], health["self_test"]["tested"]);

    let mut c = ShardClient::connect(shard.grpc.clone()).await.unwrap();
    let info = c.info(InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            info.dg.as_str(),
            info.shard,
            info.items,
            info.sha256.as_str()
        ),
        ("dg-test", 1, 300, sha.as_str())
    );

    let req = |dg: &str, k: u32, v: Vec<f32>| SearchRequest {
        vector: v,
        k,
        dg: dg.to_string(),
        clusters: vec![4],
        shard_sha256: String::new(),
    };
    let r = c
        .search(req("dg-test", 5, vectors[7].clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.hits.len(), 5);
    assert_eq!(r.hits[0].id, 507);
    assert_eq!(r.hits[0].text, "stored question 7");
    assert!(r.hits[0].score > 0.999);
    assert_eq!((r.dg.as_str(), r.shard), ("dg-test", 1));
    // Only the asked clusters are searched; a cluster the shard lacks is refused.
    let in_five = SearchRequest {
        clusters: vec![5],
        ..req("dg-test", 5, vectors[7].clone())
    };
    let r = c.search(in_five).await.unwrap().into_inner();
    assert!(r.hits.iter().all(|h| h.id >= 650), "{:?}", r.hits);
    let elsewhere = SearchRequest {
        clusters: vec![4, 6],
        ..req("dg-test", 5, vectors[7].clone())
    };
    let e = c.search(elsewhere).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message().contains("holds no cluster 6"),
        "{}",
        e.message()
    );

    let e = c
        .search(req("dg-other", 5, vectors[7].clone()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("serves dg dg-test"), "{}", e.message());
    // Another dg that pins this very file (an incremental build's unchanged shard) is
    // answered, for that dg; one pinning another file is not.
    let pinned = |pin: &str| SearchRequest {
        shard_sha256: pin.to_string(),
        ..req("dg-other", 5, vectors[7].clone())
    };
    let r = c.search(pinned(&sha)).await.unwrap().into_inner();
    assert_eq!((r.hits[0].id, r.dg.as_str()), (507, "dg-other"));
    let e = c.search(pinned(&"0".repeat(64))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let e = c.search(req("dg-test", 5, vec![0.1; 8])).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("8 dims"), "{}", e.message());
    let e = c
        .search(req("dg-test", 1000, vectors[7].clone()))
        .await
        .unwrap_err();
    assert!(e.message().contains("k is 1000"), "{}", e.message());
    let mut nan = vectors[7].clone();
    nan[0] = f32::NAN;
    let e = c.search(req("dg-test", 5, nan)).await.unwrap_err();
    assert!(e.message().contains("NaN"), "{}", e.message());

    // The light contour over the same socket: texts by their words, no vector.
    let lexical = |dg: &str, text: &str, k: u32| simq_shard::proto::LexicalRequest {
        text: text.into(),
        k,
        dg: dg.into(),
        shard_sha256: String::new(),
    };
    let r = c
        .lexical_search(lexical("dg-test", "Stored question 42?", 3))
        .await
        .unwrap()
        .into_inner();
    // "stored" and "question" are in every text: beside the rare "42" they are skipped.
    assert_eq!(r.hits.len(), 1);
    assert_eq!(
        r.hits[0].text, "stored question 42",
        "the rare word decides"
    );
    let r = c
        .lexical_search(lexical("dg-test", "stored questions", 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.hits.len(), 3, "common words alone still answer");
    let e = c
        .lexical_search(lexical("dg-other", "question", 3))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    let e = c
        .lexical_search(lexical("dg-test", "question", 0))
        .await
        .unwrap_err();
    assert!(e.message().contains("k is 0"), "{}", e.message());

    let metrics = shard.get_text("/metrics").await;
    assert!(
        metrics.contains("simq_shard_requests_total{outcome=\"ok\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("simq_shard_requests_total{outcome=\"wrong_dg\"} 3"),
        "{metrics}"
    );
}

#[test]
fn corrupt_blob_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (file, sha) = shard_file(dir.path(), &unit_vectors(300));
    // Same name, flipped bytes: the checksum fails before anything is opened.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    assert_refuses(spawn(&file, &sha, "model-a", DIMS), "checksum mismatch");
}

#[test]
fn truncated_blob_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (file, sha) = shard_file(dir.path(), &unit_vectors(300));
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    assert_refuses(spawn(&file, &sha, "model-a", DIMS), "checksum mismatch");
}

#[test]
fn shard_built_by_another_model_or_dims_fails_its_checks() {
    let dir = tempfile::tempdir().unwrap();
    let (file, sha) = shard_file(dir.path(), &unit_vectors(300));
    assert_refuses(
        spawn(&file, &sha, "model-b", DIMS),
        "built by model model-a, the dg expects model model-b",
    );
    assert_refuses(
        spawn(&file, &sha, "model-a", 384),
        "file has 32 dims, the dg expects 384",
    );
}
