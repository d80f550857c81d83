//! The shard file: one compact LMDB file holding an arroy index and the id -> text table
//! of one shard of one index generation.
//!
//! Databases inside the file:
//! - `arroy`: the arroy index (index 0, cosine distance) over the shard's vectors;
//! - `texts`: item id (u32, big-endian) -> the query text;
//! - `meta`:  key `shard` -> [`ShardMeta`] as JSON (format version, dims, model id, ...).
//!
//! Same inputs give the same bytes (one rayon thread, fixed seed, trees and map size), so
//! a file's sha256 is a stable content address. Files are opened read-only and never
//! modified in place: readers map them.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};

use arroy::distances::Cosine;
use heed::byteorder::BigEndian;
use heed::types::{Str, U32};
use heed::{CommitOrAbort, CompactionOption, Env, EnvFlags, EnvOpenOptions};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Version of the shard file layout; readers refuse other versions.
pub const FORMAT_VERSION: u32 = 1;
const ARROY_DB: &str = "arroy";
const TEXTS_DB: &str = "texts";
const META_DB: &str = "meta";
const META_KEY: &str = "shard";
const ARROY_INDEX: u16 = 0;

type ArroyDb = arroy::Database<'static, Cosine>;
type TextsDb = heed::Database<'static, U32<BigEndian>, Str>;
type MetaDb = heed::Database<'static, Str, Str>;

/// What a shard file says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub format_version: u32,
    /// Shard number inside its index generation.
    pub shard: u32,
    pub dims: usize,
    /// Always "cosine": vectors are L2-normalised, score = cosine similarity.
    pub distance: String,
    pub items: u64,
    /// Model id of the embedder that made the vectors.
    pub model_id: String,
    pub n_trees: usize,
    pub seed: u64,
}

/// Parameters of a shard build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildParams {
    pub n_trees: usize,
    pub seed: u64,
}

/// One item to index.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    pub id: u32,
    pub text: &'a str,
    pub vector: &'a [f32],
}

/// A search hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: u32,
    pub text: String,
    /// Cosine similarity, 1.0 for the same direction.
    pub score: f32,
}

/// LMDB map size for a build: a deterministic function of the data (LMDB records the
/// map size in the file, so it must not vary between builds of the same inputs).
fn map_size_for(items: usize, dims: usize, text_bytes: usize) -> usize {
    const MIB: usize = 1 << 20;
    // Vectors are stored once as items and again inside split nodes and leaves; texts once.
    let estimate = items * dims * 4 * 6 + text_bytes * 2 + 64 * MIB;
    estimate.div_ceil(64 * MIB) * 64 * MIB
}

fn lmdb(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Lmdb {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Build a shard file at `out` (replaced if it exists) from `items`.
///
/// Runs the arroy build on one rayon thread: multi-threaded builds are not
/// byte-reproducible. Parallelism comes from building several shards at once.
pub fn build_shard(
    out: &Path,
    meta_shard: u32,
    dims: usize,
    model_id: &str,
    items: &[Item<'_>],
    params: BuildParams,
) -> Result<()> {
    if items.is_empty() {
        return Err(Error::InvalidInput {
            reason: format!("shard {meta_shard} has no items"),
        });
    }
    if let Some(bad) = items.iter().find(|i| i.vector.len() != dims) {
        return Err(Error::InvalidInput {
            reason: format!(
                "item {} has {} dims, expected {dims}",
                bad.id,
                bad.vector.len()
            ),
        });
    }
    let work = tempfile::Builder::new()
        .prefix(".shard-build-")
        .tempdir_in(out.parent().unwrap_or(Path::new(".")))
        .map_err(|e| lmdb(out, e))?;
    let text_bytes: usize = items.iter().map(|i| i.text.len()).sum();
    let env = unsafe {
        EnvOpenOptions::new()
            .map_size(map_size_for(items.len(), dims, text_bytes))
            .max_dbs(4)
            .open(work.path())
    }
    .map_err(|e| lmdb(work.path(), e))?;

    let arroy_db: ArroyDb = create_db(&env, ARROY_DB, work.path())?;
    let texts_db: TextsDb = create_db(&env, TEXTS_DB, work.path())?;
    let meta_db: MetaDb = create_db(&env, META_DB, work.path())?;

    let mut wtxn = env.write_txn().map_err(|e| lmdb(work.path(), e))?;
    let mut writer = arroy::Writer::<Cosine>::new(arroy_db, ARROY_INDEX, dims);
    // arroy's temporary files go beside the build, not to /tmp.
    writer.set_tmpdir(work.path());
    for item in items {
        writer
            .add_item(&mut wtxn, item.id, item.vector)
            .map_err(|e| lmdb(work.path(), e))?;
        texts_db
            .put(&mut wtxn, &item.id, item.text)
            .map_err(|e| lmdb(work.path(), e))?;
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| lmdb(work.path(), e))?;
    let mut rng = StdRng::seed_from_u64(params.seed);
    pool.install(|| {
        writer
            .builder(&mut rng)
            .n_trees(params.n_trees)
            .build(&mut wtxn)
    })
    .map_err(|e| lmdb(work.path(), e))?;
    let meta = ShardMeta {
        format_version: FORMAT_VERSION,
        shard: meta_shard,
        dims,
        distance: "cosine".into(),
        items: items.len() as u64,
        model_id: model_id.to_string(),
        n_trees: params.n_trees,
        seed: params.seed,
    };
    let meta_json = serde_json::to_string(&meta).expect("meta serialises");
    meta_db
        .put(&mut wtxn, META_KEY, &meta_json)
        .map_err(|e| lmdb(work.path(), e))?;
    wtxn.commit().map_err(|e| lmdb(work.path(), e))?;

    // One compact file, written beside the target and renamed into place.
    let tmp_out = out.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp_out);
    env.copy_to_path(&tmp_out, CompactionOption::Enabled)
        .map_err(|e| lmdb(&tmp_out, e))?;
    std::fs::rename(&tmp_out, out).map_err(|e| lmdb(out, e))?;
    Ok(())
}

fn create_db<KC: 'static, DC: 'static>(
    env: &Env,
    name: &str,
    path: &Path,
) -> Result<heed::Database<'static, KC, DC>> {
    let wtxn = env.write_txn().map_err(|e| lmdb(path, e))?;
    env.create_databases_and_commit(wtxn, |opener, wtxn| -> heed::Result<_> {
        opener
            .create_database::<KC, DC>(wtxn, Some(name))
            .map(CommitOrAbort::<_, ()>::Commit)
    })
    .map_err(|e| lmdb(path, e))
    .map(|c| c.unwrap_commit())
}

/// An open shard file, read-only.
pub struct ShardFile {
    path: PathBuf,
    env: Env,
    arroy_db: ArroyDb,
    texts_db: TextsDb,
    meta: ShardMeta,
}

impl ShardFile {
    /// Open a shard file read-only. The directory holding it must be writable: LMDB puts
    /// its lock file beside the data file.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(lmdb(path, "no such file"));
        }
        let size = std::fs::metadata(path).map_err(|e| lmdb(path, e))?.len() as usize;
        let env = unsafe {
            EnvOpenOptions::new()
                .map_size(size.max(1 << 20).next_multiple_of(4096))
                .max_dbs(4)
                .flags(EnvFlags::READ_ONLY | EnvFlags::NO_SUB_DIR)
                .open(path)
        }
        .map_err(|e| lmdb(path, e))?;
        let missing = |what: &str| Error::NotAShard {
            path: path.to_path_buf(),
            reason: format!("database {what:?} is missing"),
        };
        let arroy_db: ArroyDb = open_db(&env, ARROY_DB, path)?.ok_or_else(|| missing(ARROY_DB))?;
        let texts_db: TextsDb = open_db(&env, TEXTS_DB, path)?.ok_or_else(|| missing(TEXTS_DB))?;
        let meta_db: MetaDb = open_db(&env, META_DB, path)?.ok_or_else(|| missing(META_DB))?;
        let rtxn = env.read_txn().map_err(|e| lmdb(path, e))?;
        let meta_json = meta_db
            .get(&rtxn, META_KEY)
            .map_err(|e| lmdb(path, e))?
            .ok_or_else(|| missing("meta/shard"))?;
        let meta: ShardMeta = serde_json::from_str(meta_json).map_err(|e| Error::NotAShard {
            path: path.to_path_buf(),
            reason: format!("shard meta is not valid: {e}"),
        })?;
        if meta.format_version != FORMAT_VERSION {
            return Err(Error::NotAShard {
                path: path.to_path_buf(),
                reason: format!(
                    "format version {} (this build reads {FORMAT_VERSION})",
                    meta.format_version
                ),
            });
        }
        // The index must open with the dims the meta claims.
        let reader = arroy::Reader::<Cosine>::open(&rtxn, ARROY_INDEX, arroy_db)
            .map_err(|e| lmdb(path, e))?;
        if reader.dimensions() != meta.dims || reader.n_items() != meta.items {
            return Err(Error::NotAShard {
                path: path.to_path_buf(),
                reason: format!(
                    "index has {} items of {} dims, meta says {} of {}",
                    reader.n_items(),
                    reader.dimensions(),
                    meta.items,
                    meta.dims
                ),
            });
        }
        drop(reader);
        drop(rtxn);
        Ok(Self {
            path: path.to_path_buf(),
            env,
            arroy_db,
            texts_db,
            meta,
        })
    }

    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `k` nearest items to `vector`. `search_k` is arroy's number of nodes to visit
    /// (None: arroy's default, k * n_trees).
    pub fn search(&self, vector: &[f32], k: usize, search_k: Option<usize>) -> Result<Vec<Hit>> {
        if vector.len() != self.meta.dims {
            return Err(Error::InvalidInput {
                reason: format!(
                    "query vector has {} dims, this shard has {}",
                    vector.len(),
                    self.meta.dims
                ),
            });
        }
        let rtxn = self.env.read_txn().map_err(|e| lmdb(&self.path, e))?;
        let reader = arroy::Reader::<Cosine>::open(&rtxn, ARROY_INDEX, self.arroy_db)
            .map_err(|e| lmdb(&self.path, e))?;
        let mut query = reader.nns(k.max(1));
        if let Some(sk) = search_k.and_then(NonZeroUsize::new) {
            query.search_k(sk);
        }
        let found = query
            .by_vector(&rtxn, vector)
            .map_err(|e| lmdb(&self.path, e))?;
        let mut hits = Vec::with_capacity(found.len());
        for (id, distance) in found {
            let text = self
                .texts_db
                .get(&rtxn, &id)
                .map_err(|e| lmdb(&self.path, e))?
                .unwrap_or_default()
                .to_string();
            // arroy's cosine distance is (1 - cos) / 2.
            hits.push(Hit {
                id,
                text,
                score: 1.0 - 2.0 * distance,
            });
        }
        Ok(hits)
    }

    /// Every item's id and vector, in id order (for evaluation and self-tests).
    pub fn vectors(&self) -> Result<Vec<(u32, Vec<f32>)>> {
        let rtxn = self.env.read_txn().map_err(|e| lmdb(&self.path, e))?;
        let reader = arroy::Reader::<Cosine>::open(&rtxn, ARROY_INDEX, self.arroy_db)
            .map_err(|e| lmdb(&self.path, e))?;
        let mut out = Vec::with_capacity(reader.n_items() as usize);
        for item in reader.iter(&rtxn).map_err(|e| lmdb(&self.path, e))? {
            let (id, v) = item.map_err(|e| lmdb(&self.path, e))?;
            out.push((id, v));
        }
        Ok(out)
    }

    /// Self-test: up to `samples` stored items, spread over the id range, must each find
    /// themselves (or an identical vector) among their 10 nearest neighbours.
    pub fn self_test(&self, samples: usize) -> Result<SelfTest> {
        let rtxn = self.env.read_txn().map_err(|e| lmdb(&self.path, e))?;
        let reader = arroy::Reader::<Cosine>::open(&rtxn, ARROY_INDEX, self.arroy_db)
            .map_err(|e| lmdb(&self.path, e))?;
        let ids: Vec<u32> = reader.item_ids().iter().collect();
        let step = (ids.len() / samples.max(1)).max(1);
        let mut tested = 0;
        let mut found = 0;
        for &id in ids.iter().step_by(step).take(samples) {
            let v = reader
                .item_vector(&rtxn, id)
                .map_err(|e| lmdb(&self.path, e))?
                .ok_or_else(|| Error::NotAShard {
                    path: self.path.clone(),
                    reason: format!("item {id} is listed but has no vector"),
                })?;
            let hits = reader
                .nns(10)
                .by_vector(&rtxn, &v)
                .map_err(|e| lmdb(&self.path, e))?;
            tested += 1;
            if hits.iter().any(|&(hit, d)| hit == id || d < 1e-6) {
                found += 1;
            }
            if self
                .texts_db
                .get(&rtxn, &id)
                .map_err(|e| lmdb(&self.path, e))?
                .is_none()
            {
                return Err(Error::NotAShard {
                    path: self.path.clone(),
                    reason: format!("item {id} has no text"),
                });
            }
        }
        Ok(SelfTest { tested, found })
    }
}

/// Outcome of [`ShardFile::self_test`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelfTest {
    pub tested: usize,
    pub found: usize,
}

impl SelfTest {
    /// Passing means at least 99% of the sampled items found themselves.
    pub fn passed(&self) -> bool {
        self.tested > 0 && self.found * 100 >= self.tested * 99
    }
}

fn open_db<KC: 'static, DC: 'static>(
    env: &Env,
    name: &str,
    path: &Path,
) -> Result<Option<heed::Database<'static, KC, DC>>> {
    let rtxn = env.read_txn().map_err(|e| lmdb(path, e))?;
    env.open_databases_and_commit(rtxn, |opener, rtxn| -> heed::Result<_> {
        opener
            .open_database::<KC, DC>(rtxn, Some(name))
            .map(CommitOrAbort::<_, ()>::Commit)
    })
    .map_err(|e| lmdb(path, e))
    .map(|c| c.unwrap_commit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngExt;

    fn vectors(n: usize, dims: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let mut v: Vec<f32> = (0..dims).map(|_| rng.random::<f32>() - 0.5).collect();
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter_mut().for_each(|x| *x /= n);
                v
            })
            .collect()
    }

    fn build(dir: &Path, name: &str, vs: &[Vec<f32>]) -> PathBuf {
        let texts: Vec<String> = (0..vs.len()).map(|i| format!("query {i}")).collect();
        let items: Vec<Item> = vs
            .iter()
            .enumerate()
            .map(|(i, v)| Item {
                id: 1000 + i as u32,
                text: &texts[i],
                vector: v,
            })
            .collect();
        let out = dir.join(name);
        build_shard(
            &out,
            3,
            16,
            "test-model",
            &items,
            BuildParams {
                n_trees: 4,
                seed: 7,
            },
        )
        .unwrap();
        out
    }

    #[test]
    fn same_inputs_give_byte_identical_files() {
        let dir = tempfile::tempdir().unwrap();
        let vs = vectors(300, 16, 1);
        let a = std::fs::read(build(dir.path(), "a.lmdb", &vs)).unwrap();
        let b = std::fs::read(build(dir.path(), "b.lmdb", &vs)).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(a == b, "two builds of the same items differ");
        let c = std::fs::read(build(dir.path(), "c.lmdb", &vectors(300, 16, 2))).unwrap();
        assert!(a != c, "different items give different bytes");
    }

    #[test]
    fn stored_items_find_themselves_with_cosine_scores() {
        let dir = tempfile::tempdir().unwrap();
        let vs = vectors(200, 16, 3);
        let shard = ShardFile::open(&build(dir.path(), "s.lmdb", &vs)).unwrap();
        assert_eq!(shard.meta().items, 200);
        assert_eq!(shard.meta().shard, 3);
        assert_eq!(shard.meta().model_id, "test-model");
        let hits = shard.search(&vs[42], 5, None).unwrap();
        assert_eq!(hits[0].id, 1042);
        assert_eq!(hits[0].text, "query 42");
        assert!(
            (hits[0].score - 1.0).abs() < 1e-4,
            "self score {}",
            hits[0].score
        );
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        let t = shard.self_test(50).unwrap();
        assert_eq!(t.tested, 50);
        assert!(t.passed(), "{t:?}");
    }

    #[test]
    fn wrong_dims_query_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shard = ShardFile::open(&build(dir.path(), "s.lmdb", &vectors(20, 16, 4))).unwrap();
        let err = shard.search(&[0.0; 8], 5, None).unwrap_err().to_string();
        assert!(err.contains("8 dims") && err.contains("16"), "{err}");
    }

    #[test]
    fn a_file_that_is_not_a_shard_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let bogus = dir.path().join("bogus.lmdb");
        std::fs::write(&bogus, vec![7u8; 64 * 1024]).unwrap();
        let err = ShardFile::open(&bogus).err().expect("refused").to_string();
        assert!(err.contains("bogus.lmdb"), "{err}");
    }
}
