//! `simq-indexer build --base DG`: a new dg from a built one and a change set, in the time
//! it takes to embed the change.
//!
//! The new dg keeps the base's model, centroids and BM25 statistics. Only the added texts
//! are embedded (the base's own vectors and texts are read back from its shard files, so
//! this works on any machine that has the base dg). Each added text joins its nearest
//! fine cluster; a shard file is written again only when an item of it was added or
//! removed, and every other shard file is the base's, byte for byte (same sha256, so the
//! blob store and the shards that serve it need nothing new). Item ids of the base stay;
//! added texts get ids after the base's largest. Same base and change set, same bytes.
//!
//! Kept centroids fit a changed corpus less and less. Before writing anything the build
//! measures that ([`Drift`]): how well the added texts fit their clusters against how well
//! the base's fit theirs, whether a cluster grows far past the base's largest, whether
//! one is left empty, and (each step of a chain of incremental builds keeps the centroids
//! and BM25 statistics of the last full build) whether the corpus has grown or shrunk by
//! more than a fifth since that build. Past the bounds it rebuilds in full (k-means
//! again, over the base's vectors and the new ones: nothing is embedded twice) unless
//! told to keep the centroids.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use simq_contract::kv::{sha256_file, BaseInfo, BuildInfo, Manifest};
use simq_contract::CentroidMap;
use simq_embedder::runtime::Embedder;
use simq_shard::lexical::CorpusStats;
use simq_shard::{ClusterItems, Item};
use simq_vector::dot;

use crate::build::{
    build_dir, build_embedded, embed_all, index_shards, seal_into, shard_file_name, BuildOptions,
    ShardSettings, CENTROIDS_FILE,
};
use crate::corpus::{fold, texts_sha256};
use crate::eval::{read_centroids, DgDir};
use crate::publish::read_manifest;

/// Texts to add to a base dg and texts to remove from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    pub add: Vec<String>,
    pub remove: Vec<String>,
}

impl ChangeSet {
    /// The change from the texts of a base dg to a new full corpus, by the corpus's
    /// de-duplication key (case folded): the corpus's texts the base lacks are added (in
    /// corpus order), the base's texts the corpus lacks are removed (in base order).
    pub fn diff<'a>(base: impl IntoIterator<Item = &'a str>, corpus: &[String]) -> Self {
        let base: Vec<&str> = base.into_iter().collect();
        let in_base: HashSet<String> = base.iter().map(|t| fold(t)).collect();
        let in_corpus: HashSet<String> = corpus.iter().map(|t| fold(t)).collect();
        Self {
            add: corpus
                .iter()
                .filter(|t| !in_base.contains(&fold(t)))
                .cloned()
                .collect(),
            remove: base
                .iter()
                .filter(|t| !in_corpus.contains(&fold(t)))
                .map(|t| t.to_string())
                .collect(),
        }
    }
}

/// One stored item of the base dg.
#[derive(Debug, Clone)]
pub struct BaseItem {
    pub id: u32,
    pub cluster: u32,
    pub text: String,
    pub vector: Vec<f32>,
}

/// A built dg read back for an incremental build: manifest, centroids, every item and
/// the BM25 statistics its shard files were written with.
pub struct Base {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub map: CentroidMap,
    /// By id.
    pub items: Vec<BaseItem>,
    pub stats: CorpusStats,
}

impl Base {
    /// Read the dg in `dir`, checking every shard file against the manifest's sha256
    /// first (its bytes are reused as they are).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let (manifest, _) = read_manifest(dir)?;
        for entry in &manifest.shards {
            let path = dir.join(shard_file_name(entry.shard as usize));
            let sha = sha256_file(&path).with_context(|| format!("reading {}", path.display()))?;
            if sha != entry.sha256 {
                bail!(
                    "{}: sha256 {sha}, the manifest of {} pins {}: the base dg is damaged",
                    path.display(),
                    manifest.dg,
                    entry.sha256
                );
            }
        }
        let dg = DgDir::open(dir)?;
        let mut items = Vec::with_capacity(manifest.items as usize);
        let (mut meta, mut dfs) = (None, HashMap::new());
        for (s, file) in dg.shards.iter().enumerate() {
            let texts: HashMap<u32, String> = file.texts()?.into_iter().collect();
            for (id, cluster, vector) in file.vectors()? {
                let text = texts.get(&id).cloned().with_context(|| {
                    format!("shard {s} of {}: item {id} has no text", manifest.dg)
                })?;
                items.push(BaseItem {
                    id,
                    cluster,
                    text,
                    vector,
                });
            }
            let Some((m, terms)) = file.lexical_stats()? else {
                bail!(
                    "shard {s} of {} has no lexical index (built before simq had one): build it again in full",
                    manifest.dg
                );
            };
            if meta.is_some_and(|first| first != m) {
                bail!(
                    "the shards of {} disagree on their BM25 statistics",
                    manifest.dg
                );
            }
            meta = Some(m);
            dfs.extend(terms);
        }
        items.sort_by_key(|i| i.id);
        if items.windows(2).any(|w| w[0].id == w[1].id) {
            bail!("{} holds an item id twice", manifest.dg);
        }
        let stats = CorpusStats::from_written(meta.expect("a manifest lists shards"), dfs);
        Ok(Self {
            dir: dir.to_path_buf(),
            map: read_centroids(dir, &manifest)?,
            manifest,
            items,
            stats,
        })
    }

    /// The base's texts in id order.
    pub fn texts(&self) -> impl Iterator<Item = &str> {
        self.items.iter().map(|i| i.text.as_str())
    }
}

/// What a change set means for a base: which items go, which texts come (with their
/// ids), and what of it did not apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Base item ids removed, ascending.
    pub removed: Vec<u32>,
    /// New items: (id, text), ids ascending after the base's largest.
    pub added: Vec<(u32, String)>,
    /// Texts to remove that the base does not hold.
    pub not_found: Vec<String>,
    /// Texts to add that the (changed) base already holds, or that came twice.
    pub already_present: usize,
}

/// Apply `change` to the base's (id, text) items: removals first, then additions that the
/// remaining items do not already hold (by the corpus's de-duplication key).
pub fn plan<'a>(base: impl IntoIterator<Item = (u32, &'a str)>, change: &ChangeSet) -> Plan {
    let mut by_key: HashMap<String, u32> = HashMap::new();
    let mut next = 0u32;
    for (id, text) in base {
        by_key.insert(fold(text), id);
        next = next.max(id.saturating_add(1));
    }
    let mut out = Plan::default();
    for text in &change.remove {
        match by_key.remove(&fold(text)) {
            Some(id) => out.removed.push(id),
            None => out.not_found.push(text.clone()),
        }
    }
    out.removed.sort_unstable();
    let mut present: HashSet<String> = by_key.into_keys().collect();
    for text in &change.add {
        if present.insert(fold(text)) {
            out.added.push((next, text.clone()));
            next = next.saturating_add(1);
        } else {
            out.already_present += 1;
        }
    }
    out
}

/// How far a change moves the corpus away from the base's centroids.
#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    /// Mean cosine of the base's items to their cluster's centroid.
    pub base_fit: f32,
    /// Mean cosine of the added items to their nearest centroid (the one they join).
    pub added_fit: f32,
    /// Items of the largest cluster over the mean cluster size, before and after.
    pub base_imbalance: f64,
    pub imbalance: f64,
    /// Clusters the change leaves without items.
    pub emptied: Vec<u32>,
    /// Texts the centroids and BM25 statistics were computed on (the last full build: an
    /// incremental build keeps both, so a chain of small changes adds up here).
    pub frozen_docs: u64,
    /// Texts of the dg after the change.
    pub docs: u64,
}

/// When kept centroids no longer fit (defaults measured on the full corpus: a 1 % change
/// of new questions moved the fit by 0.01 and the imbalance by 1 %, see BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DriftBounds {
    /// The added texts may fit their clusters at most this much worse than the base's.
    pub max_fit_drop: f32,
    /// The largest cluster, relative to the mean, may grow at most this many times.
    pub max_imbalance_growth: f64,
    /// The dg's text count may differ from the last full build's by at most this share
    /// of it. Each step of a chain of incremental builds is measured against its base, so
    /// without this bound many small steps would never rebuild; past a fifth, the frozen
    /// BM25 document count and mean length move lexical scores by about as much.
    pub max_change_since_full: f64,
}

impl Default for DriftBounds {
    fn default() -> Self {
        Self {
            max_fit_drop: 0.05,
            max_imbalance_growth: 1.5,
            max_change_since_full: 0.2,
        }
    }
}

impl Drift {
    /// Measure: `fits` are the cosines of the base items to their centroids and `added`
    /// those of the new items; `before` and `after` the cluster sizes; `frozen_docs` the
    /// texts of the last full build (its BM25 statistics' document count).
    pub fn measure(
        fits: &[f32],
        added: &[f32],
        before: &[usize],
        after: &[usize],
        frozen_docs: u64,
    ) -> Self {
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
        let imbalance = |sizes: &[usize]| {
            let total: usize = sizes.iter().sum();
            let largest = sizes.iter().copied().max().unwrap_or(0);
            largest as f64 * sizes.len() as f64 / total.max(1) as f64
        };
        Self {
            base_fit: mean(fits),
            added_fit: if added.is_empty() {
                mean(fits)
            } else {
                mean(added)
            },
            base_imbalance: imbalance(before),
            imbalance: imbalance(after),
            emptied: before
                .iter()
                .zip(after)
                .enumerate()
                .filter(|(_, (&b, &a))| b > 0 && a == 0)
                .map(|(c, _)| c as u32)
                .collect(),
            frozen_docs,
            docs: after.iter().sum::<usize>() as u64,
        }
    }

    /// How far the dg's text count is from the last full build's, as a share of it.
    pub fn change_since_full(&self) -> f64 {
        self.docs.abs_diff(self.frozen_docs) as f64 / self.frozen_docs.max(1) as f64
    }

    /// Ok when the base's centroids still fit; else why not, with the numbers.
    pub fn verdict(&self, bounds: &DriftBounds) -> Result<(), String> {
        let mut why = Vec::new();
        if self.added_fit < self.base_fit - bounds.max_fit_drop {
            why.push(format!(
                "the added texts fit their clusters with a mean cosine of {:.3} against {:.3} for the base's (bound: {:.3} less)",
                self.added_fit, self.base_fit, bounds.max_fit_drop
            ));
        }
        if self.imbalance > self.base_imbalance * bounds.max_imbalance_growth {
            why.push(format!(
                "the largest cluster would hold {:.1} times the mean cluster size against {:.1} in the base (bound: {:.1} times that)",
                self.imbalance, self.base_imbalance, bounds.max_imbalance_growth
            ));
        }
        if self.change_since_full() > bounds.max_change_since_full {
            why.push(format!(
                "the dg would hold {} texts, {:.0} % {} than the {} its centroids and BM25 statistics were computed on in its last full build (bound: {:.0} %)",
                self.docs,
                100.0 * self.change_since_full(),
                if self.docs > self.frozen_docs { "more" } else { "fewer" },
                self.frozen_docs,
                100.0 * bounds.max_change_since_full
            ));
        }
        if !self.emptied.is_empty() {
            why.push(format!(
                "{} clusters would be left empty (first: {})",
                self.emptied.len(),
                self.emptied[0]
            ));
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }
}

/// The items of each cluster after the change (ids ascending) and the shards whose
/// content changed. `base` and `added` are (id, cluster).
pub fn layout(
    base: &[(u32, u32)],
    removed: &[u32],
    added: &[(u32, u32)],
    shard_of: &[u32],
) -> (Vec<Vec<u32>>, BTreeSet<usize>) {
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); shard_of.len()];
    let mut changed = BTreeSet::new();
    for &(id, cluster) in base {
        if removed.binary_search(&id).is_ok() {
            changed.insert(shard_of[cluster as usize] as usize);
        } else {
            members[cluster as usize].push(id);
        }
    }
    for &(id, cluster) in added {
        members[cluster as usize].push(id);
        changed.insert(shard_of[cluster as usize] as usize);
    }
    for m in &mut members {
        m.sort_unstable();
    }
    (members, changed)
}

/// Knobs of an incremental build.
#[derive(Debug, Clone, Copy)]
pub struct UpdateOptions {
    pub embed_chunk: usize,
    pub parallel_shards: usize,
    pub bounds: DriftBounds,
    /// Keep the base's centroids even past the drift bounds.
    pub allow_drift: bool,
    /// Lloyd iterations of the full rebuild, if the drift guard asks for one.
    pub kmeans_iterations: usize,
}

/// What an incremental build did.
#[derive(Debug)]
pub struct UpdateReport {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The same dg was already in the output directory (or nothing changed: the base).
    pub unchanged: bool,
    pub plan: Plan,
    pub drift: Drift,
    /// Why the base's centroids no longer fit, when they do not ([`Drift::verdict`]).
    pub past_bounds: Option<String>,
    /// The drift guard rebuilt in full (else the base's centroids were kept).
    pub rebuilt: bool,
    /// Shard files written (the others are the base's).
    pub shards_rewritten: Vec<u32>,
    /// Bytes of the files written (shard files, centroids, manifest); the reused ones
    /// are hard links to the base's, or copies where the file system has none.
    pub bytes_written: u64,
    pub read: Duration,
    pub embed: Duration,
    pub index: Duration,
    pub total: Duration,
}

/// Build the dg `change` makes of `base` into `<out>/<dg>/`.
pub fn update(
    base: &Base,
    change: &ChangeSet,
    embedder: &Embedder,
    out: &Path,
    opts: UpdateOptions,
    read: Duration,
) -> anyhow::Result<UpdateReport> {
    let started = Instant::now();
    let m = &base.manifest;
    if embedder.model_id() != m.model_id {
        bail!(
            "the base dg {} was built with model {}, the model given is {}: an incremental build keeps the base's model (build in full for another)",
            m.dg,
            m.model_id,
            embedder.model_id()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let plan = plan(base.items.iter().map(|i| (i.id, i.text.as_str())), change);
    let dims = m.dims;

    let t = Instant::now();
    let texts: Vec<String> = plan.added.iter().map(|(_, t)| t.clone()).collect();
    let vectors = embed_all(embedder, &texts, opts.embed_chunk)?;
    let embed = t.elapsed();
    tracing::info!(
        texts = texts.len(),
        seconds = embed.as_secs_f64(),
        "embedded the added texts"
    );

    let added: Vec<(u32, u32)> = plan
        .added
        .iter()
        .zip(vectors.chunks_exact(dims))
        .map(|((id, _), v)| (*id, base.map.nearest(v, 1)[0]))
        .collect();
    let base_ids: Vec<(u32, u32)> = base.items.iter().map(|i| (i.id, i.cluster)).collect();
    let (members, changed) = layout(&base_ids, &plan.removed, &added, &m.clusters.shard_of);
    let mut before = vec![0usize; members.len()];
    for &(_, c) in &base_ids {
        before[c as usize] += 1;
    }
    let after: Vec<usize> = members.iter().map(Vec::len).collect();
    let fits: Vec<f32> = base
        .items
        .iter()
        .map(|i| dot(&i.vector, base.map.centroid(i.cluster as usize)))
        .collect();
    let added_fits: Vec<f32> = added
        .iter()
        .zip(vectors.chunks_exact(dims))
        .map(|(&(_, c), v)| dot(v, base.map.centroid(c as usize)))
        .collect();
    let drift = Drift::measure(&fits, &added_fits, &before, &after, base.stats.docs);
    let verdict = drift.verdict(&opts.bounds);
    tracing::info!(
        added = plan.added.len(),
        removed = plan.removed.len(),
        base_fit = drift.base_fit,
        added_fit = drift.added_fit,
        base_imbalance = drift.base_imbalance,
        imbalance = drift.imbalance,
        docs = drift.docs,
        frozen_docs = drift.frozen_docs,
        verdict = verdict
            .as_ref()
            .err()
            .map_or("the base's centroids fit", String::as_str),
        "change measured"
    );

    let report = |dir, manifest, unchanged, rebuilt, shards_rewritten, bytes_written, index| {
        Ok(UpdateReport {
            dir,
            manifest,
            unchanged,
            plan: plan.clone(),
            drift: drift.clone(),
            past_bounds: verdict.clone().err(),
            rebuilt,
            shards_rewritten,
            bytes_written,
            read,
            embed,
            index,
            total: started.elapsed() + read,
        })
    };
    if plan.added.is_empty() && plan.removed.is_empty() {
        return report(
            base.dir.clone(),
            m.clone(),
            true,
            false,
            Vec::new(),
            0,
            Duration::ZERO,
        );
    }
    if !drift.emptied.is_empty() && opts.allow_drift {
        bail!(
            "cannot keep the centroids of {}: the change leaves {} of its clusters empty (first: {}), and a dg's every cluster needs an item; build without --allow-drift (a full rebuild)",
            m.dg,
            drift.emptied.len(),
            drift.emptied[0]
        );
    }
    if verdict.is_err() && !opts.allow_drift {
        // Full rebuild over every remaining item; the added texts' vectors are the ones
        // just made.
        let t = Instant::now();
        let removed: HashSet<u32> = plan.removed.iter().copied().collect();
        let kept = base.items.iter().filter(|i| !removed.contains(&i.id));
        let mut all_texts: Vec<String> = kept.clone().map(|i| i.text.clone()).collect();
        let mut all_vectors: Vec<f32> = kept.flat_map(|i| i.vector.iter().copied()).collect();
        all_texts.extend(texts);
        all_vectors.extend(vectors);
        let built = build_embedded(
            &all_texts,
            &all_vectors,
            (&m.model_id, dims),
            &texts_sha256(all_texts.iter().map(String::as_str)),
            out,
            BuildOptions {
                shards: m.shards.len(),
                clusters: m.build.clusters_requested,
                seed: m.build.seed,
                kmeans_iterations: opts.kmeans_iterations,
                embed_chunk: opts.embed_chunk,
                parallel_shards: opts.parallel_shards,
            },
        )?;
        let bytes = dir_bytes(&built.dir)?;
        let shards = (0..built.manifest.shards.len() as u32).collect();
        return report(
            built.dir,
            built.manifest,
            built.unchanged,
            true,
            shards,
            bytes,
            t.elapsed(),
        );
    }

    // Keep the centroids: write the changed shards, link the others.
    let t = Instant::now();
    let work = build_dir(out)?;
    let stats = base.stats.extended_by(texts.iter().map(String::as_str));
    let first_new = plan.added.first().map_or(u32::MAX, |(id, _)| *id);
    let item = |id: u32| -> Item {
        if id >= first_new {
            let k = (id - first_new) as usize;
            Item {
                id,
                text: &plan.added[k].1,
                vector: &vectors[k * dims..(k + 1) * dims],
            }
        } else {
            // (Base items are sorted by id.)
            let b = &base.items[base
                .items
                .binary_search_by_key(&id, |i| i.id)
                .expect("a kept id is a base item")];
            Item {
                id,
                text: &b.text,
                vector: &b.vector,
            }
        }
    };
    let todo: Vec<usize> = changed.iter().copied().collect();
    let shard_of = &m.clusters.shard_of;
    let mut written = index_shards(
        work.path(),
        &todo,
        &ShardSettings {
            dims,
            model_id: &m.model_id,
            seed: m.build.seed,
            lexical: &stats,
            parallel: opts.parallel_shards,
        },
        |s| {
            members
                .iter()
                .enumerate()
                .filter(|(c, _)| shard_of[*c] as usize == s)
                .map(|(c, ids)| ClusterItems {
                    id: c as u32,
                    items: ids.iter().map(|&id| item(id)).collect(),
                })
                .collect()
        },
    )?
    .into_iter();
    let mut bytes_written = 0;
    let mut shards = Vec::with_capacity(m.shards.len());
    for entry in &m.shards {
        let s = entry.shard as usize;
        if changed.contains(&s) {
            let new = written.next().expect("a written entry per changed shard");
            bytes_written += new.size;
            shards.push(new);
        } else {
            let name = shard_file_name(s);
            bytes_written += link_or_copy(&base.dir.join(&name), &work.path().join(&name))?;
            shards.push(entry.clone());
        }
    }
    bytes_written += link_or_copy(
        &base.dir.join(CENTROIDS_FILE),
        &work.path().join(CENTROIDS_FILE),
    )?;
    let mut ids: Vec<u32> = members.iter().flatten().copied().collect();
    ids.sort_unstable();
    let rewritten: Vec<u32> = todo.iter().map(|&s| s as u32).collect();
    let manifest = Manifest {
        dg: String::new(),
        items: ids.len() as u64,
        build: BuildInfo {
            corpus_sha256: texts_sha256(ids.iter().map(|&id| item(id).text)),
            base: Some(BaseInfo {
                dg: m.dg.clone(),
                added: plan.added.len() as u64,
                removed: plan.removed.len() as u64,
                shards_rewritten: rewritten.clone(),
            }),
            ..m.build.clone()
        },
        shards,
        ..m.clone()
    };
    let (dir, manifest, unchanged) = seal_into(work, manifest, out)?;
    bytes_written += std::fs::metadata(dir.join("manifest.json"))?.len();
    report(
        dir,
        manifest,
        unchanged,
        false,
        rewritten,
        bytes_written,
        t.elapsed(),
    )
}

/// Hard-link `from` to `to` (files of a dg are never written in place), or copy it where
/// that is not possible; the bytes written (0 for a link).
fn link_or_copy(from: &Path, to: &Path) -> anyhow::Result<u64> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(0);
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// Bytes of the files in `dir`.
fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        total += entry?.metadata()?.len();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(texts: &[&str]) -> Vec<String> {
        texts.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn a_new_corpus_is_diffed_against_the_base_by_folded_text() {
        let base = ["How to cook rice", "why is the sky blue", "what is rust"];
        let corpus = strings(&["how to cook RICE", "what is rust", "who wrote hamlet"]);
        let change = ChangeSet::diff(base, &corpus);
        assert_eq!(change.add, strings(&["who wrote hamlet"]));
        assert_eq!(change.remove, strings(&["why is the sky blue"]));
    }

    #[test]
    fn removals_go_first_additions_get_ids_after_the_largest_and_repeats_are_counted() {
        let base = [(0, "a b"), (3, "c d"), (7, "e f")];
        let change = ChangeSet {
            add: strings(&["new one", "A B", "new one", "C D"]),
            remove: strings(&["c d", "not there"]),
        };
        let p = plan(base, &change);
        assert_eq!(p.removed, vec![3]);
        // "C D" was removed and comes back as a new item; "A B" is still there.
        assert_eq!(
            p.added,
            vec![(8, "new one".to_string()), (9, "C D".to_string())]
        );
        assert_eq!(p.not_found, strings(&["not there"]));
        assert_eq!(p.already_present, 2);
    }

    #[test]
    fn only_the_shards_that_gain_or_lose_an_item_change() {
        // Clusters 0, 1 in shard 0; 2 in shard 1; 3 in shard 2.
        let shard_of = [0, 0, 1, 2];
        let base = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 2)];
        let (members, changed) = layout(&base, &[], &[], &shard_of);
        assert!(changed.is_empty());
        assert_eq!(members, vec![vec![0], vec![1], vec![2, 4], vec![3]]);
        let (members, changed) = layout(&base, &[4], &[(5, 1)], &shard_of);
        assert_eq!(changed.into_iter().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(members, vec![vec![0], vec![1, 5], vec![2], vec![3]]);
    }

    #[test]
    fn the_drift_guard_passes_a_small_even_change_and_stops_a_skewed_one() {
        let bounds = DriftBounds::default();
        let fits = [0.7, 0.6, 0.65, 0.75];
        let before = [10, 12, 8, 10];
        let even = Drift::measure(&fits, &[0.68, 0.66], &before, &[11, 12, 9, 10], 40);
        assert_eq!(even.verdict(&bounds), Ok(()));
        // Every added text lands in one cluster.
        let skewed = Drift::measure(&fits, &[0.68; 30], &before, &[40, 12, 8, 10], 70);
        let why = skewed.verdict(&bounds).unwrap_err();
        assert!(why.contains("largest cluster"), "{why}");
        assert!(!why.contains("last full build"), "{why}");
        // Texts unlike anything in the base.
        let foreign = Drift::measure(&fits, &[0.3, 0.35], &before, &[11, 12, 9, 10], 40);
        assert!(foreign
            .verdict(&bounds)
            .unwrap_err()
            .contains("mean cosine"));
        // A cluster emptied by removals.
        let emptied = Drift::measure(&fits, &[], &before, &[10, 12, 0, 10], 40);
        assert!(emptied.verdict(&bounds).unwrap_err().contains("left empty"));
    }

    #[test]
    fn a_chain_of_small_changes_rebuilds_once_it_adds_up_to_a_fifth_of_the_last_full_build() {
        let bounds = DriftBounds::default();
        let fits = [0.7, 0.6, 0.65, 0.75];
        // Each step adds 4 texts evenly to the 40 of the last step (10 % of it, within
        // every per-step bound), while the statistics stay those of the 40-text full build.
        let step = |before: [usize; 4]| {
            let after = before.map(|n| n + 1);
            Drift::measure(&fits, &[0.68; 4], &before, &after, 40)
        };
        let first = step([10, 10, 10, 10]);
        assert_eq!((first.docs, first.verdict(&bounds)), (44, Ok(())));
        let second = step([11, 11, 11, 11]);
        assert_eq!((second.docs, second.verdict(&bounds)), (48, Ok(())));
        let third = step([12, 12, 12, 12]);
        let why = third.verdict(&bounds).unwrap_err();
        assert!(
            why.contains("52 texts, 30 % more than the 40") && why.contains("bound: 20 %"),
            "{why}"
        );
        // Shrinking counts too.
        let shrunk = Drift::measure(&fits, &[], &[10, 10, 10, 10], &[7, 7, 7, 7], 40);
        assert!(shrunk.verdict(&bounds).unwrap_err().contains("30 % fewer"));
    }
}
