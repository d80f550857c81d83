//! The model directory: its manifest (`simq-model.json`) and its content-addressed model id.
//!
//! A model directory holds `model.onnx`, `tokenizer.json` and `simq-model.json`. The
//! manifest says how to run the model (dims, pooling, max tokens, query prefix) and pins
//! each file's sha256, so a directory that was tampered with or half-copied is refused.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The manifest file's name inside a model directory.
pub const MANIFEST_FILE: &str = "simq-model.json";

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Mean of the token vectors under the attention mask (sentence-transformers default).
    Mean,
    /// The first ([CLS]) token's vector.
    Cls,
}

/// `simq-model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelManifest {
    /// Human-readable name; the model id starts with it.
    pub name: String,
    /// Where the files come from (documentation only).
    #[serde(default)]
    pub source: String,
    /// Width of the output vectors.
    pub dims: usize,
    pub pooling: Pooling,
    /// L2-normalise the pooled vector (needed for cosine scores from dot products).
    pub normalize: bool,
    /// Texts are truncated to this many tokens.
    pub max_tokens: usize,
    /// Prepended to every text before tokenising (e5 models want "query: ").
    #[serde(default)]
    pub query_prefix: String,
    /// Name of the ONNX output holding token vectors [batch, seq, dims].
    pub onnx_output: String,
    /// sha256 of each file of the directory, by file name: model.onnx and tokenizer.json.
    pub files: std::collections::BTreeMap<String, String>,
}

/// A model directory whose files were checked against its manifest.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub path: PathBuf,
    pub manifest: ModelManifest,
    /// `<name>-<first 12 hex of a sha256 over manifest and files>`.
    pub model_id: String,
}

impl ModelDir {
    /// Open a model directory: read the manifest, verify every pinned file's sha256, and
    /// derive the model id.
    pub fn open(path: &Path) -> Result<Self> {
        let manifest_path = path.join(MANIFEST_FILE);
        let manifest_bytes = std::fs::read(&manifest_path).map_err(|e| Error::ModelFile {
            path: manifest_path.clone(),
            reason: format!(
                "{e} (is {} a model directory made by scripts/setup.sh?)",
                path.display()
            ),
        })?;
        let manifest: ModelManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| Error::ModelFile {
                path: manifest_path.clone(),
                reason: format!("not a valid model manifest: {e}"),
            })?;
        for required in ["model.onnx", "tokenizer.json"] {
            if !manifest.files.contains_key(required) {
                return Err(Error::ModelFile {
                    path: manifest_path.clone(),
                    reason: format!("manifest pins no sha256 for {required}"),
                });
            }
        }
        if manifest.dims == 0 || manifest.max_tokens == 0 {
            return Err(Error::ModelFile {
                path: manifest_path,
                reason: "dims and max_tokens must be positive".into(),
            });
        }
        let mut id_hash = Sha256::new();
        id_hash.update((manifest_bytes.len() as u64).to_le_bytes());
        id_hash.update(&manifest_bytes);
        for (file, expected) in &manifest.files {
            let file_path = path.join(file);
            let got = sha256_file(&file_path)?;
            if &got != expected {
                return Err(Error::ModelFile {
                    path: file_path,
                    reason: format!("sha256 mismatch: manifest pins {expected}, file has {got}; run scripts/setup.sh model"),
                });
            }
            id_hash.update(file.as_bytes());
            id_hash.update(got.as_bytes());
        }
        let model_id = format!(
            "{}-{}",
            manifest.name,
            &hex::encode(id_hash.finalize())[..12]
        );
        Ok(Self {
            path: path.to_path_buf(),
            manifest,
            model_id,
        })
    }

    pub fn onnx_path(&self) -> PathBuf {
        self.path.join("model.onnx")
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.path.join("tokenizer.json")
    }
}

/// Hex sha256 of a model file, with the path in the error.
fn sha256_file(path: &Path) -> Result<String> {
    simq_contract::kv::sha256_file(path).map_err(|e| Error::ModelFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_dir(dir: &Path, onnx: &[u8], pinned_onnx: &str) {
        std::fs::write(dir.join("model.onnx"), onnx).unwrap();
        std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
        let tok = hex::encode(Sha256::digest(b"{}"));
        let manifest = serde_json::json!({
            "name": "test-model", "dims": 4, "pooling": "mean", "normalize": true,
            "max_tokens": 8, "onnx_output": "last_hidden_state",
            "files": {"model.onnx": pinned_onnx, "tokenizer.json": tok}
        });
        std::fs::write(dir.join(MANIFEST_FILE), manifest.to_string()).unwrap();
    }

    #[test]
    fn model_id_is_a_content_hash() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_dir(a.path(), b"one", &hex::encode(Sha256::digest(b"one")));
        write_dir(b.path(), b"two", &hex::encode(Sha256::digest(b"two")));
        let ma = ModelDir::open(a.path()).unwrap();
        assert!(ma.model_id.starts_with("test-model-"));
        assert_eq!(ma.model_id, ModelDir::open(a.path()).unwrap().model_id);
        assert_ne!(ma.model_id, ModelDir::open(b.path()).unwrap().model_id);
    }

    #[test]
    fn tampered_model_file_is_refused_with_its_path() {
        let d = tempfile::tempdir().unwrap();
        write_dir(
            d.path(),
            b"changed",
            &hex::encode(Sha256::digest(b"original")),
        );
        let err = ModelDir::open(d.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.onnx") && err.contains("sha256 mismatch"),
            "{err}"
        );
    }

    #[test]
    fn missing_directory_says_what_to_run() {
        let err = ModelDir::open(Path::new("/nonexistent/model"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("simq-model.json") && err.contains("scripts/setup.sh"),
            "{err}"
        );
    }
}
