//! What a shard instance checks before it reports healthy: the file is the blob its
//! content address names, it is the shard of the dg it is meant to be, built by the
//! expected model with the expected dims, and stored items find themselves.

use std::path::Path;

use crate::format::{SelfTest, ShardFile};

/// What the instance was told to serve (from the manifest, via the job spec).
#[derive(Debug, Clone)]
pub struct Expected {
    /// The blob's content address.
    pub sha256: String,
    pub shard: u32,
    pub model_id: String,
    pub dims: usize,
    /// Items sampled by the self-test.
    pub self_test_samples: usize,
}

/// Why a shard file must not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VerifyError(pub String);

/// Run every check; the file is returned open only when all pass.
pub fn verify(path: &Path, expected: &Expected) -> Result<(ShardFile, SelfTest), VerifyError> {
    let got = simq_contract::kv::sha256_file(path)
        .map_err(|e| VerifyError(format!("cannot read {}: {e}", path.display())))?;
    if !got.eq_ignore_ascii_case(&expected.sha256) {
        return Err(VerifyError(format!(
            "checksum mismatch for {}: expected sha256 {}, got {got}",
            path.display(),
            expected.sha256
        )));
    }
    let file = ShardFile::open(path).map_err(|e| VerifyError(e.to_string()))?;
    let meta = file.meta();
    if meta.shard != expected.shard {
        return Err(VerifyError(format!(
            "file holds shard {}, expected shard {}",
            meta.shard, expected.shard
        )));
    }
    if meta.model_id != expected.model_id {
        return Err(VerifyError(format!(
            "file was built by model {}, the dg expects model {}",
            meta.model_id, expected.model_id
        )));
    }
    if meta.dims != expected.dims {
        return Err(VerifyError(format!(
            "file has {} dims, the dg expects {}",
            meta.dims, expected.dims
        )));
    }
    let test = file
        .self_test(expected.self_test_samples)
        .map_err(|e| VerifyError(e.to_string()))?;
    if !test.passed() {
        return Err(VerifyError(format!(
            "self-test failed: {} of {} sampled items found themselves",
            test.found, test.tested
        )));
    }
    Ok((file, test))
}
