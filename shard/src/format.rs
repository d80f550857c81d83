//! The shard file: one compact LMDB file holding the fine clusters of one shard of one
//! index generation, each as its own arroy index, and the id -> text table.
//!
//! Databases inside the file:
//! - `arroy`: one arroy index per cluster (index id = the dg-wide cluster number, cosine
//!   distance) over the cluster's vectors;
//! - `scan`: cluster number (u32, big-endian) -> the cluster's scan block: every item's
//!   vector as int8 codes in one value ([`crate::scan`]);
//! - `texts`: item id (u32, big-endian) -> the query text;
//! - `meta`:  key `shard` -> [`ShardMeta`] as JSON (format version, dims, model id,
//!   clusters, ...);
//! - `lexical`: term -> its postings in this shard, for the light contour's BM25 search
//!   without the model ([`crate::lexical`]; absent in files built before it).
//!
//! A query searches only the clusters the balancer asks for. Clusters hold a few dozen
//! items, so each arroy index is one leaf ("descendants" node). A search reads each probed
//! cluster's scan block in one pass, ranks every item by its int8 codes, and re-scores the
//! best candidates exactly with their f32 vectors from arroy: the approximation lives in
//! which clusters are probed, as in an IVF index (why: indexer/BENCH.md). Same
//! inputs give the same bytes (one rayon thread, fixed seed and map size), so a file's
//! sha256 is a stable content address. Files are opened read-only and never modified in
//! place: readers map them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arroy::distances::Cosine;
use heed::byteorder::BigEndian;
use heed::types::{Str, U32};
use heed::{CommitOrAbort, CompactionOption, Env, EnvFlags, EnvOpenOptions, RoTxn};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use simq_vector::dot;

use crate::error::{Error, Result};
use crate::lexical::{self, CorpusStats, LexicalMeta};
use crate::scan;

/// Candidates re-scored exactly per search: `k * RERANK_FACTOR`, at least `RERANK_MIN`.
/// The int8 scores rank so close to the exact ones that re-scoring the best 2 k gave the
/// same recall@10 as 8 k (0.9878, `simq-indexer eval`, 1000 queries, full corpus) and only
/// k gave 0.9823; 4 k keeps twice the margin that was needed, at 0.55-0.62 against
/// 0.66-0.72 ms per query for 8 k.
const RERANK_FACTOR: usize = 4;
const RERANK_MIN: usize = 32;

/// Version of the shard file layout; readers refuse other versions. 2: one arroy index
/// per fine cluster (1 held one index for the whole shard).
pub const FORMAT_VERSION: u32 = 2;
const ARROY_DB: &str = "arroy";
const TEXTS_DB: &str = "texts";
const SCAN_DB: &str = "scan";
const META_DB: &str = "meta";
const META_KEY: &str = "shard";
const LEXICAL_DB: &str = "lexical";

type ArroyDb = arroy::Database<'static, Cosine>;
type TextsDb = heed::Database<'static, U32<BigEndian>, Str>;
type MetaDb = heed::Database<'static, Str, Str>;
type ScanDb = heed::Database<'static, U32<BigEndian>, heed::types::Bytes>;
type LexicalDb = heed::Database<'static, Str, heed::types::Bytes>;

/// One cluster of a shard file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    /// The dg-wide cluster number, also its arroy index id.
    pub id: u32,
    pub items: u64,
}

/// What a shard file says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub seed: u64,
    /// The clusters in this file, by cluster number.
    pub clusters: Vec<ClusterMeta>,
    /// The dg-wide BM25 statistics of the `lexical` database (None: the file has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical: Option<LexicalMeta>,
}

/// Parameters of a shard build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildParams {
    pub seed: u64,
}

/// One item to index.
#[derive(Debug, Clone, Copy)]
pub struct Item<'a> {
    pub id: u32,
    pub text: &'a str,
    pub vector: &'a [f32],
}

/// The items of one fine cluster.
#[derive(Debug, Clone)]
pub struct ClusterItems<'a> {
    /// The dg-wide cluster number (< 65536: arroy index ids are u16).
    pub id: u32,
    pub items: Vec<Item<'a>>,
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
fn map_size_for(items: usize, dims: usize, text_bytes: usize, clusters: usize) -> usize {
    const MIB: usize = 1 << 20;
    // Vectors once as items, descendant bitmaps and metadata per cluster, texts once;
    // doubled for LMDB's copy-on-write pages.
    // The lexical postings take about 8 bytes per word plus each term's key: within
    // twice the texts' bytes.
    let estimate = (items * (dims * 4 + 64) + text_bytes * 3 + clusters * 4096) * 2 + 64 * MIB;
    estimate.div_ceil(64 * MIB) * 64 * MIB
}

fn lmdb(path: &Path, e: impl StoreError) -> Error {
    Error::Lmdb {
        path: path.to_path_buf(),
        reason: e.to_string(),
        map_full: e.map_full(),
    }
}

/// An error met on a shard file; heed's and arroy's say whether LMDB's map was full.
trait StoreError: std::fmt::Display {
    fn map_full(&self) -> bool {
        false
    }
}

impl StoreError for std::io::Error {}
impl StoreError for rayon::ThreadPoolBuildError {}
impl StoreError for &str {}

impl StoreError for heed::Error {
    fn map_full(&self) -> bool {
        matches!(self, heed::Error::Mdb(heed::MdbError::MapFull))
    }
}

impl StoreError for arroy::Error {
    fn map_full(&self) -> bool {
        matches!(self, arroy::Error::Heed(e) if e.map_full())
    }
}

fn arroy_index(cluster: u32, path: &Path) -> Result<u16> {
    u16::try_from(cluster).map_err(|_| Error::InvalidInput {
        reason: format!(
            "cluster {cluster} in {}: cluster numbers must be below 65536",
            path.display()
        ),
    })
}

/// Build a shard file at `out` (replaced if it exists) from its clusters.
///
/// Runs arroy on one rayon thread: multi-threaded builds are not byte-reproducible.
/// Parallelism comes from building several shards at once.
pub fn build_shard(
    out: &Path,
    meta_shard: u32,
    dims: usize,
    model_id: &str,
    clusters: &[ClusterItems<'_>],
    params: BuildParams,
    lexical: Option<&CorpusStats>,
) -> Result<()> {
    let items: usize = clusters.iter().map(|c| c.items.len()).sum();
    if items == 0 {
        return Err(Error::InvalidInput {
            reason: format!("shard {meta_shard} has no items"),
        });
    }
    if let Some(c) = clusters.iter().find(|c| c.items.is_empty()) {
        return Err(Error::InvalidInput {
            reason: format!("cluster {} of shard {meta_shard} has no items", c.id),
        });
    }
    if let Some(bad) = clusters
        .iter()
        .flat_map(|c| &c.items)
        .find(|i| i.vector.len() != dims)
    {
        return Err(Error::InvalidInput {
            reason: format!(
                "item {} has {} dims, expected {dims}",
                bad.id,
                bad.vector.len()
            ),
        });
    }
    let text_bytes: usize = clusters
        .iter()
        .flat_map(|c| &c.items)
        .map(|i| i.text.len())
        .sum();
    // Without the dg's statistics (a single shard, tests): this shard's own.
    let own;
    let stats = match lexical {
        Some(stats) => stats,
        None => {
            own = CorpusStats::from_texts(clusters.iter().flat_map(|c| &c.items).map(|i| i.text));
            &own
        }
    };
    let first = map_size_for(items, dims, text_bytes, clusters.len());
    write_shard_growing(first, |map_size| {
        write_shard(
            out, meta_shard, dims, model_id, clusters, params, stats, map_size,
        )
    })
}

/// LMDB map sizes tried at most, each twice the last.
const MAP_SIZE_TRIES: u32 = 6;

/// Run `write` with map size `first`, and again with twice the size while LMDB says the
/// map is full: the estimate is a deterministic function of the data (so the bytes of a
/// build that fits stay the same), and doubling from it keeps the result deterministic.
fn write_shard_growing(first: usize, mut write: impl FnMut(usize) -> Result<()>) -> Result<()> {
    let mut map_size = first;
    for _ in 1..MAP_SIZE_TRIES {
        match write(map_size) {
            Err(e) if e.is_map_full() => {
                tracing::info!(
                    map_size,
                    "LMDB map full; building the shard again with twice the map size"
                );
                map_size *= 2;
            }
            done => return done,
        }
    }
    write(map_size)
}

/// One attempt of [`build_shard`] with an LMDB map of `map_size` bytes.
#[allow(clippy::too_many_arguments)]
fn write_shard(
    out: &Path,
    meta_shard: u32,
    dims: usize,
    model_id: &str,
    clusters: &[ClusterItems<'_>],
    params: BuildParams,
    stats: &CorpusStats,
    map_size: usize,
) -> Result<()> {
    let items: usize = clusters.iter().map(|c| c.items.len()).sum();
    let work = tempfile::Builder::new()
        .prefix(".shard-build-")
        .tempdir_in(out.parent().unwrap_or(Path::new(".")))
        .map_err(|e| lmdb(out, e))?;
    let env = open_env(work.path(), map_size, false).map_err(|e| lmdb(work.path(), e))?;

    let arroy_db: ArroyDb = create_db(&env, ARROY_DB, work.path())?;
    let texts_db: TextsDb = create_db(&env, TEXTS_DB, work.path())?;
    let meta_db: MetaDb = create_db(&env, META_DB, work.path())?;
    let scan_db: ScanDb = create_db(&env, SCAN_DB, work.path())?;
    let lexical_db: LexicalDb = create_db(&env, LEXICAL_DB, work.path())?;

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| lmdb(work.path(), e))?;
    let mut rng = StdRng::seed_from_u64(params.seed);
    let mut wtxn = env.write_txn().map_err(|e| lmdb(work.path(), e))?;
    let mut metas = Vec::with_capacity(clusters.len());
    for cluster in clusters {
        let index = arroy_index(cluster.id, out)?;
        let writer = arroy::Writer::<Cosine>::new(arroy_db, index, dims);
        // arroy's temporary files go beside the build, not to /tmp.
        let mut writer = writer;
        writer.set_tmpdir(work.path());
        for item in &cluster.items {
            writer
                .add_item(&mut wtxn, item.id, item.vector)
                .map_err(|e| lmdb(work.path(), e))?;
            texts_db
                .put(&mut wtxn, &item.id, item.text)
                .map_err(|e| lmdb(work.path(), e))?;
        }
        let block: Vec<(u32, &[f32])> = cluster.items.iter().map(|i| (i.id, i.vector)).collect();
        scan_db
            .put(&mut wtxn, &cluster.id, &scan::encode(&block, dims))
            .map_err(|e| lmdb(work.path(), e))?;
        // One tree whose root holds every item.
        let split_after = cluster.items.len().max(dims);
        pool.install(|| {
            writer
                .builder(&mut rng)
                .n_trees(1)
                .split_after(split_after)
                .build(&mut wtxn)
        })
        .map_err(|e| lmdb(work.path(), e))?;
        metas.push(ClusterMeta {
            id: cluster.id,
            items: cluster.items.len() as u64,
        });
    }
    let shard_postings = lexical::postings(
        clusters
            .iter()
            .flat_map(|c| &c.items)
            .map(|i| (i.id, i.text)),
    );
    for (term, list) in &shard_postings {
        let df = stats.df.get(term).copied().unwrap_or(list.len() as u32);
        lexical_db
            .put(&mut wtxn, term, &lexical::encode_postings(df, list))
            .map_err(|e| lmdb(work.path(), e))?;
    }
    metas.sort_by_key(|c| c.id);
    if metas.windows(2).any(|w| w[0].id == w[1].id) {
        return Err(Error::InvalidInput {
            reason: format!("shard {meta_shard} lists a cluster twice"),
        });
    }
    let meta = ShardMeta {
        format_version: FORMAT_VERSION,
        shard: meta_shard,
        dims,
        distance: "cosine".into(),
        items: items as u64,
        model_id: model_id.to_string(),
        seed: params.seed,
        clusters: metas,
        lexical: Some(stats.meta()),
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

/// Open an LMDB environment: `read_only` maps one sealed shard file (no subdirectory),
/// otherwise the new directory a build writes.
#[allow(unsafe_code)] // heed's `flags` and `open` are unsafe, see SAFETY
fn open_env(path: &Path, map_size: usize, read_only: bool) -> heed::Result<Env> {
    let mut options = EnvOpenOptions::new();
    options.map_size(map_size).max_dbs(6);
    if read_only {
        // SAFETY: heed calls only NO_SYNC, NO_META_SYNC and NO_LOCK unsafe (they give up
        // durability or locking); READ_ONLY and NO_SUB_DIR give up neither.
        unsafe { options.flags(EnvFlags::READ_ONLY | EnvFlags::NO_SUB_DIR) };
    }
    // SAFETY: LMDB needs that no other process truncates or rewrites a file while it is
    // mapped, and that a process opens one environment once. A build opens the temporary
    // directory it just created; a shard file is sealed (content-addressed, never written
    // again), and each `ShardFile` is the one handle of its file in its process.
    unsafe { options.open(path) }
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

/// What a shard file keeps of its dg's BM25 statistics: the dg-wide numbers and each of
/// its terms with its dg-wide document frequency ([`ShardFile::lexical_stats`]).
pub type TermStats = (LexicalMeta, Vec<(String, u32)>);

/// An open shard file, read-only.
pub struct ShardFile {
    path: PathBuf,
    env: Env,
    arroy_db: ArroyDb,
    texts_db: TextsDb,
    scan_db: ScanDb,
    /// The light contour's postings (None in files built before it).
    lexical_db: Option<LexicalDb>,
    meta: ShardMeta,
    /// Cluster number -> items, for request checks.
    clusters: BTreeMap<u32, u64>,
}

impl ShardFile {
    /// Open a shard file read-only. The directory holding it must be writable: LMDB puts
    /// its lock file beside the data file.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(lmdb(path, "no such file"));
        }
        let size = std::fs::metadata(path).map_err(|e| lmdb(path, e))?.len() as usize;
        let env = open_env(path, size.max(1 << 20).next_multiple_of(4096), true)
            .map_err(|e| lmdb(path, e))?;
        let not_a_shard = |reason: String| Error::NotAShard {
            path: path.to_path_buf(),
            reason,
        };
        let missing = |what: &str| not_a_shard(format!("database {what:?} is missing"));
        let arroy_db: ArroyDb = open_db(&env, ARROY_DB, path)?.ok_or_else(|| missing(ARROY_DB))?;
        let texts_db: TextsDb = open_db(&env, TEXTS_DB, path)?.ok_or_else(|| missing(TEXTS_DB))?;
        let meta_db: MetaDb = open_db(&env, META_DB, path)?.ok_or_else(|| missing(META_DB))?;
        let scan_db: ScanDb = open_db(&env, SCAN_DB, path)?.ok_or_else(|| missing(SCAN_DB))?;
        let lexical_db: Option<LexicalDb> = open_db(&env, LEXICAL_DB, path)?;
        let rtxn = env.read_txn().map_err(|e| lmdb(path, e))?;
        let meta_json = meta_db
            .get(&rtxn, META_KEY)
            .map_err(|e| lmdb(path, e))?
            .ok_or_else(|| missing("meta/shard"))?;
        // The version first, so an old file says so instead of failing on a field.
        let version = serde_json::from_str::<serde_json::Value>(meta_json)
            .ok()
            .and_then(|v| v.get("format_version")?.as_u64());
        if version != Some(FORMAT_VERSION as u64) {
            return Err(not_a_shard(format!(
                "format version {} (this build reads {FORMAT_VERSION}); rebuild the dg with this simq-indexer",
                version.map_or("unknown".to_string(), |v| v.to_string())
            )));
        }
        let meta: ShardMeta = serde_json::from_str(meta_json)
            .map_err(|e| not_a_shard(format!("shard meta is not valid: {e}")))?;
        // Every cluster must open with the dims and item count the meta claims.
        let mut clusters = BTreeMap::new();
        for c in &meta.clusters {
            let reader = arroy::Reader::<Cosine>::open(&rtxn, arroy_index(c.id, path)?, arroy_db)
                .map_err(|e| not_a_shard(format!("cluster {}: {e}", c.id)))?;
            if reader.dimensions() != meta.dims || reader.n_items() != c.items {
                return Err(not_a_shard(format!(
                    "cluster {} has {} items of {} dims, meta says {} of {}",
                    c.id,
                    reader.n_items(),
                    reader.dimensions(),
                    c.items,
                    meta.dims
                )));
            }
            let block = scan_db
                .get(&rtxn, &c.id)
                .map_err(|e| lmdb(path, e))?
                .and_then(|b| scan::Block::parse(b, meta.dims));
            if block.map(|b| b.len() as u64) != Some(c.items) {
                return Err(not_a_shard(format!(
                    "cluster {} has no scan block of {} items of {} dims",
                    c.id, c.items, meta.dims
                )));
            }
            clusters.insert(c.id, c.items);
        }
        if lexical_db.is_some() != meta.lexical.is_some() {
            return Err(not_a_shard(format!(
                "the lexical database and its statistics in the meta must come together (database: {}, statistics: {})",
                lexical_db.is_some(),
                meta.lexical.is_some()
            )));
        }
        let total: u64 = clusters.values().sum();
        if total != meta.items || clusters.len() != meta.clusters.len() {
            return Err(not_a_shard(format!(
                "clusters hold {total} items, meta says {}",
                meta.items
            )));
        }
        drop(rtxn);
        Ok(Self {
            path: path.to_path_buf(),
            env,
            arroy_db,
            texts_db,
            scan_db,
            lexical_db,
            meta,
            clusters,
        })
    }

    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Does this file hold `cluster`?
    pub fn has_cluster(&self, cluster: u32) -> bool {
        self.clusters.contains_key(&cluster)
    }

    fn reader<'t>(&self, rtxn: &'t RoTxn, cluster: u32) -> Result<arroy::Reader<'t, Cosine>> {
        let index = arroy_index(cluster, &self.path)?;
        arroy::Reader::open(rtxn, index, self.arroy_db).map_err(|e| lmdb(&self.path, e))
    }

    /// The `k` nearest items to `vector` among the given clusters (every cluster of the
    /// file when `clusters` is empty). Asking for a cluster the file does not hold is an
    /// error: the caller routes with another dg's map.
    pub fn search(&self, vector: &[f32], k: usize, clusters: &[u32]) -> Result<Vec<Hit>> {
        if vector.len() != self.meta.dims {
            return Err(Error::InvalidInput {
                reason: format!(
                    "query vector has {} dims, this shard has {}",
                    vector.len(),
                    self.meta.dims
                ),
            });
        }
        if let Some(c) = clusters.iter().find(|c| !self.has_cluster(**c)) {
            return Err(Error::InvalidInput {
                reason: format!("shard {} holds no cluster {c}", self.meta.shard),
            });
        }
        let all: Vec<u32>;
        let clusters = if clusters.is_empty() {
            all = self.clusters.keys().copied().collect();
            &all
        } else {
            clusters
        };
        let rtxn = self.env.read_txn().map_err(|e| lmdb(&self.path, e))?;
        self.search_in(&rtxn, vector, k, clusters)
    }

    /// [`Self::search`] inside an open read transaction (LMDB allows one per thread).
    fn search_in(
        &self,
        rtxn: &RoTxn,
        vector: &[f32],
        k: usize,
        clusters: &[u32],
    ) -> Result<Vec<Hit>> {
        let k = k.max(1);
        // Rank every item of the asked clusters by its int8 codes, one sequential read per
        // cluster; then re-score the best candidates exactly.
        let query = scan::quantize(vector);
        let mut candidates: Vec<(u32, u32, f32)> = Vec::new();
        for &cluster in clusters {
            let bytes = self
                .scan_db
                .get(rtxn, &cluster)
                .map_err(|e| lmdb(&self.path, e))?
                .unwrap_or_default();
            let block =
                scan::Block::parse(bytes, self.meta.dims).ok_or_else(|| Error::NotAShard {
                    path: self.path.clone(),
                    reason: format!("cluster {cluster} has no valid scan block"),
                })?;
            block.scores(&query, |id, approx| candidates.push((id, cluster, approx)));
        }
        let rerank = (k * RERANK_FACTOR).max(RERANK_MIN);
        if candidates.len() > rerank {
            candidates.select_nth_unstable_by(rerank - 1, |a, b| b.2.total_cmp(&a.2));
            candidates.truncate(rerank);
        }
        let mut found: Vec<(u32, f32)> = Vec::with_capacity(candidates.len());
        let mut readers: Vec<(u32, arroy::Reader<Cosine>)> = Vec::new();
        for (id, cluster, _) in candidates {
            let reader = match readers.iter().position(|(c, _)| *c == cluster) {
                Some(i) => &readers[i].1,
                None => {
                    readers.push((cluster, self.reader(rtxn, cluster)?));
                    &readers.last().expect("just pushed").1
                }
            };
            let v = reader
                .item_vector(rtxn, id)
                .map_err(|e| lmdb(&self.path, e))?
                .ok_or_else(|| Error::NotAShard {
                    path: self.path.clone(),
                    reason: format!("item {id} of cluster {cluster} has no vector"),
                })?;
            found.push((id, dot(&v, vector)));
        }
        let by_score = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        found.sort_by(by_score);
        found.dedup_by_key(|h| h.0);
        found.truncate(k);
        let mut hits = Vec::with_capacity(found.len());
        for (id, score) in found {
            let text = self
                .texts_db
                .get(rtxn, &id)
                .map_err(|e| lmdb(&self.path, e))?
                .unwrap_or_default()
                .to_string();
            // Vectors are L2-normalised: the dot product is the cosine similarity.
            hits.push(Hit { id, text, score });
        }
        Ok(hits)
    }

    /// The light contour: the best `k` items of this shard for `query` by BM25 over their
    /// texts (dg-wide statistics: scores of different shards merge), best first. An error
    /// when the file has no lexical index (built before it).
    pub fn lexical_search(&self, query: &str, k: usize) -> Result<Vec<Hit>> {
        let (Some(db), Some(meta)) = (self.lexical_db, self.meta.lexical) else {
            return Err(Error::InvalidInput {
                reason: format!(
                    "shard {} has no lexical index (built before simq had one); rebuild the dg",
                    self.meta.shard
                ),
            });
        };
        let rtxn = self.env.read_txn().map_err(|e| lmdb(&self.path, e))?;
        let mut failed = None;
        let found = lexical::search(query, k.max(1), meta, |term| {
            db.get(&rtxn, term).unwrap_or_else(|e| {
                failed.get_or_insert(e);
                None
            })
        });
        if let Some(e) = failed {
            return Err(lmdb(&self.path, e));
        }
        let mut hits = Vec::with_capacity(found.len());
        for (id, score) in found {
            let text = self
                .texts_db
                .get(&rtxn, &id)
                .map_err(|e| lmdb(&self.path, e))?
                .unwrap_or_default()
                .to_string();
            hits.push(Hit { id, text, score });
        }
        Ok(hits)
    }

    /// The text of item `id`, if this file holds it.
    pub fn text(&self, id: u32) -> Result<Option<String>> {
        let rtxn = self.env.read_txn().map_err(|e| lmdb(&self.path, e))?;
        Ok(self
            .texts_db
            .get(&rtxn, &id)
            .map_err(|e| lmdb(&self.path, e))?
            .map(str::to_string))
    }

    /// Every item's id and text, in id order.
    pub fn texts(&self) -> Result<Vec<(u32, String)>> {
        let rtxn = self.env.read_txn().map_err(|e| lmdb(&self.path, e))?;
        let mut out = Vec::with_capacity(self.meta.items as usize);
        for entry in self.texts_db.iter(&rtxn).map_err(|e| lmdb(&self.path, e))? {
            let (id, text) = entry.map_err(|e| lmdb(&self.path, e))?;
            out.push((id, text.to_string()));
        }
        Ok(out)
    }

    /// The dg-wide BM25 statistics this file was written with (documents, mean length,
    /// and the document frequency of every term it holds), or None when it has no lexical
    /// index. A dg's statistics are the union over its shard files.
    pub fn lexical_stats(&self) -> Result<Option<TermStats>> {
        let (Some(db), Some(meta)) = (self.lexical_db, self.meta.lexical) else {
            return Ok(None);
        };
        let rtxn = self.env.read_txn().map_err(|e| lmdb(&self.path, e))?;
        let mut dfs = Vec::new();
        for entry in db.iter(&rtxn).map_err(|e| lmdb(&self.path, e))? {
            let (term, bytes) = entry.map_err(|e| lmdb(&self.path, e))?;
            let Some((df, _)) = lexical::decode_postings(bytes) else {
                return Err(Error::NotAShard {
                    path: self.path.clone(),
                    reason: format!("the postings of term {term:?} are not valid"),
                });
            };
            dfs.push((term.to_string(), df));
        }
        Ok(Some((meta, dfs)))
    }

    /// Every item's id, cluster and vector, in id order (for evaluation and self-tests).
    pub fn vectors(&self) -> Result<Vec<(u32, u32, Vec<f32>)>> {
        let rtxn = self.env.read_txn().map_err(|e| lmdb(&self.path, e))?;
        let mut out = Vec::with_capacity(self.meta.items as usize);
        for &cluster in self.clusters.keys() {
            let reader = self.reader(&rtxn, cluster)?;
            for item in reader.iter(&rtxn).map_err(|e| lmdb(&self.path, e))? {
                let (id, v) = item.map_err(|e| lmdb(&self.path, e))?;
                out.push((id, cluster, v));
            }
        }
        out.sort_by_key(|(id, _, _)| *id);
        Ok(out)
    }

    /// Self-test: up to `samples` stored items, spread over the clusters, must each find
    /// themselves (or an identical vector) among their 10 nearest neighbours in their
    /// cluster, and have a text.
    pub fn self_test(&self, samples: usize) -> Result<SelfTest> {
        let rtxn = self.env.read_txn().map_err(|e| lmdb(&self.path, e))?;
        let mut all: Vec<(u32, u32)> = Vec::with_capacity(self.meta.items as usize);
        for &cluster in self.clusters.keys() {
            let reader = self.reader(&rtxn, cluster)?;
            all.extend(reader.item_ids().iter().map(|id| (cluster, id)));
        }
        let step = (all.len() / samples.max(1)).max(1);
        let mut tested = 0;
        let mut found = 0;
        for &(cluster, id) in all.iter().step_by(step).take(samples) {
            let reader = self.reader(&rtxn, cluster)?;
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
            // Both arroy's own search and the scan path must find the item.
            let scanned = self.search_in(&rtxn, &v, 10, &[cluster])?;
            if hits.iter().any(|&(hit, d)| hit == id || d < 1e-6)
                && scanned.iter().any(|h| h.id == id || h.score > 1.0 - 1e-5)
            {
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

    /// Items 1000.. in clusters 7 (even positions) and 9 (odd positions).
    fn build(dir: &Path, name: &str, vs: &[Vec<f32>]) -> PathBuf {
        let texts: Vec<String> = (0..vs.len()).map(|i| format!("query {i}")).collect();
        let mut clusters = vec![
            ClusterItems {
                id: 7,
                items: Vec::new(),
            },
            ClusterItems {
                id: 9,
                items: Vec::new(),
            },
        ];
        for (i, v) in vs.iter().enumerate() {
            clusters[i % 2].items.push(Item {
                id: 1000 + i as u32,
                text: &texts[i],
                vector: v,
            });
        }
        let out = dir.join(name);
        build_shard(
            &out,
            3,
            16,
            "test-model",
            &clusters,
            BuildParams { seed: 7 },
            None,
        )
        .unwrap();
        out
    }

    #[test]
    fn a_full_map_is_tried_again_twice_as_large_a_bounded_number_of_times() {
        let full = || Error::Lmdb {
            path: "s.lmdb".into(),
            reason: "MDB_MAP_FULL: Environment mapsize limit reached".into(),
            map_full: true,
        };
        let mut sizes = Vec::new();
        let fits_at_4 = write_shard_growing(1, |m| {
            sizes.push(m);
            if m < 4 {
                Err(full())
            } else {
                Ok(())
            }
        });
        assert!(fits_at_4.is_ok());
        assert_eq!(sizes, [1, 2, 4]);
        sizes.clear();
        let never = write_shard_growing(1, |m| {
            sizes.push(m);
            Err(full())
        });
        assert!(never.unwrap_err().is_map_full());
        assert_eq!(sizes.len(), MAP_SIZE_TRIES as usize);
        // Other errors are not retried.
        sizes.clear();
        let other = write_shard_growing(1, |m| {
            sizes.push(m);
            Err(Error::InvalidInput {
                reason: "no".into(),
            })
        });
        assert!(!other.unwrap_err().is_map_full());
        assert_eq!(sizes, [1]);
    }

    #[test]
    fn a_shard_larger_than_the_first_map_size_is_built_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (dims, n) = (256, 3000);
        let vs = vectors(n, dims, 5);
        let texts: Vec<String> = (0..n).map(|i| format!("query {i}")).collect();
        let items = vs
            .iter()
            .enumerate()
            .map(|(i, v)| Item {
                id: i as u32,
                text: &texts[i],
                vector: v,
            })
            .collect();
        let clusters = [ClusterItems { id: 1, items }];
        let out = dir.path().join("big.lmdb");
        // 1 MiB holds well under the 3 MB of vectors: the first tries fill the map.
        let write = |m| {
            write_shard(
                &out,
                0,
                dims,
                "test-model",
                &clusters,
                BuildParams { seed: 1 },
                &CorpusStats::default(),
                m,
            )
        };
        assert!(write(1 << 20).unwrap_err().is_map_full());
        write_shard_growing(1 << 20, write).unwrap();
        let shard = ShardFile::open(&out).unwrap();
        assert_eq!(shard.meta().items, n as u64);
        assert_eq!(shard.search(&vs[17], 1, &[1]).unwrap()[0].id, 17);
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
    fn the_lexical_index_finds_items_by_their_words() {
        let dir = tempfile::tempdir().unwrap();
        let texts = [
            "how to cook rice",
            "reset my router",
            "learn rust fast",
            "cook pasta at home",
            "rust borrow checker",
            "router lights blink",
        ];
        let vs = vectors(texts.len(), 8, 3);
        let clusters = vec![ClusterItems {
            id: 0,
            items: texts
                .iter()
                .zip(&vs)
                .enumerate()
                .map(|(i, (text, vector))| Item {
                    id: i as u32,
                    text,
                    vector,
                })
                .collect(),
        }];
        let out = dir.path().join("lexical.lmdb");
        build_shard(&out, 0, 8, "m", &clusters, BuildParams { seed: 1 }, None).unwrap();
        let f = ShardFile::open(&out).unwrap();
        assert_eq!(f.meta().lexical.unwrap().docs, 6);
        let hits = f.lexical_search("Router RESET?", 2).unwrap();
        assert_eq!(hits.len(), 2);
        assert_eq!(hits[0].text, "reset my router");
        assert_eq!(hits[1].text, "router lights blink");
        assert!(f.lexical_search("zebra", 3).unwrap().is_empty());
    }

    #[test]
    fn search_is_exact_within_the_asked_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let vs = vectors(200, 16, 3);
        let shard = ShardFile::open(&build(dir.path(), "s.lmdb", &vs)).unwrap();
        assert_eq!(shard.meta().items, 200);
        assert_eq!(shard.meta().shard, 3);
        assert_eq!(shard.meta().model_id, "test-model");
        assert_eq!(
            shard.meta().clusters,
            vec![
                ClusterMeta { id: 7, items: 100 },
                ClusterMeta { id: 9, items: 100 }
            ]
        );
        // Item 42 is in cluster 7: found there, first, with score 1.
        let hits = shard.search(&vs[42], 5, &[7]).unwrap();
        assert_eq!(hits[0].id, 1042);
        assert_eq!(hits[0].text, "query 42");
        assert!(
            (hits[0].score - 1.0).abs() < 1e-4,
            "self score {}",
            hits[0].score
        );
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        // Exact: the same top 5 as a brute-force scan of cluster 7.
        let mut exact: Vec<(u32, f32)> = (0..200)
            .step_by(2)
            .map(|i| {
                (
                    1000 + i as u32,
                    vs[i].iter().zip(&vs[42]).map(|(a, b)| a * b).sum(),
                )
            })
            .collect();
        exact.sort_by(|a, b| b.1.total_cmp(&a.1));
        let ids: Vec<u32> = hits.iter().map(|h| h.id).collect();
        assert_eq!(ids, exact[..5].iter().map(|e| e.0).collect::<Vec<_>>());
        // Cluster 9 does not hold it; all clusters do.
        assert!(shard
            .search(&vs[42], 5, &[9])
            .unwrap()
            .iter()
            .all(|h| h.id % 2 == 1));
        assert_eq!(shard.search(&vs[42], 1, &[]).unwrap()[0].id, 1042);
        let t = shard.self_test(50).unwrap();
        assert_eq!(t.tested, 50);
        assert!(t.passed(), "{t:?}");
    }

    #[test]
    fn a_cluster_the_file_does_not_hold_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vs = vectors(20, 16, 4);
        let shard = ShardFile::open(&build(dir.path(), "s.lmdb", &vs)).unwrap();
        let err = shard.search(&vs[0], 5, &[7, 8]).unwrap_err().to_string();
        assert!(err.contains("holds no cluster 8"), "{err}");
    }

    #[test]
    fn wrong_dims_query_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let shard = ShardFile::open(&build(dir.path(), "s.lmdb", &vectors(20, 16, 4))).unwrap();
        let err = shard.search(&[0.0; 8], 5, &[]).unwrap_err().to_string();
        assert!(err.contains("8 dims") && err.contains("16"), "{err}");
    }

    #[test]
    fn vectors_lists_every_item_with_its_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let vs = vectors(10, 16, 5);
        let shard = ShardFile::open(&build(dir.path(), "s.lmdb", &vs)).unwrap();
        let all = shard.vectors().unwrap();
        assert_eq!(all.len(), 10);
        assert_eq!((all[3].0, all[3].1), (1003, 9));
        assert_eq!(all[4].2, vs[4]);
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
