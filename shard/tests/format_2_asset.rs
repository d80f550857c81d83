//! A newer simq serves the shard files an older one built: the format-2 shard file kept in
//! `testdata/format-2/` passes every check a shard runs before it reports healthy (content
//! address, shard number, model, dims, self-test) and answers searches.

use simq_shard::format::ShardFile;
use simq_shard::verify::{verify, Expected};

#[test]
fn the_format_2_shard_file_verifies_and_answers() {
    // CARGO_MANIFEST_DIR read at run time (cargo test sets it): a binary reused from
    // another checkout through a shared target dir must not look in that checkout.
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    let testdata = crate_dir.join("../testdata/format-2");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(testdata.join("manifest.json")).unwrap()).unwrap();
    // LMDB writes a lock file beside the data file: work on a copy, not in the repo.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("shard-0.lmdb");
    std::fs::copy(testdata.join("shard-0.lmdb"), &file).unwrap();
    let expected = Expected {
        sha256: manifest["shards"][0]["sha256"]
            .as_str()
            .unwrap()
            .to_string(),
        shard: 0,
        model_id: manifest["model_id"].as_str().unwrap().to_string(),
        dims: 384,
        self_test_samples: 40,
    };
    let (opened, test) = verify(&file, &expected).expect("the format-2 file verifies");
    assert_eq!((test.tested, test.found), (40, 40));
    assert_eq!(opened.meta().items, 40);
    drop(opened);

    // A stored item, searched for with its own vector, comes back first.
    let shard = ShardFile::open(&file).unwrap();
    let centroids = std::fs::read(testdata.join("centroids.f32")).unwrap();
    let first: Vec<f32> = centroids[..384 * 4]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let hits = shard.search(&first, 5, &[0, 1]).unwrap();
    assert_eq!(hits.len(), 5, "{hits:?}");
    assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
}
