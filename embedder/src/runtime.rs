//! The model runtime: tokenise, run ONNX Runtime, pool, normalise. Used by the embedder
//! service and by `indexer build`, so the index and the queries share one code path.
//!
//! Throughput design (measured, see embedder/BENCH.md): one single-threaded ONNX session
//! per core beats one multi-threaded session, and batches of texts with similar token
//! counts beat batches padded to an arbitrary longest text. [`Embedder::embed`] therefore
//! sorts its texts by token count, cuts them into batches of at most `max_batch`, and
//! runs the batches on a pool of sessions in parallel. A lone text cannot be split over
//! sessions; the optional "lone" session, with a thread per core, runs calls too small
//! to give every session a text, so a single query still uses every core.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use ndarray::Array2;
use ort::session::{builder::GraphOptimizationLevel, Session};
use ort::value::TensorRef;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::{ModelDir, Pooling};

/// Calls with fewer texts are tokenised on the calling thread, larger ones on rayon's
/// pool (an index build's batches).
const PARALLEL_TOKENIZE_TEXTS: usize = 64;

/// How many sessions and threads the runtime uses (measured on 2 cores in
/// embedder/BENCH.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// ONNX sessions run in parallel.
    pub sessions: usize,
    /// Intra-op threads of each session.
    pub intra_threads: usize,
    /// Texts per inference call at most.
    pub max_batch: usize,
    /// Intra-op threads of one more session that runs the calls with fewer texts than
    /// `sessions` (a lone query), so that they still use several cores; 0: no such session.
    pub lone_threads: usize,
}

/// Cores available to this process (1 when unknown).
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl RuntimeOptions {
    /// The embedder service: one single-threaded session per core for batches, and a lone
    /// session with a thread per core for single queries.
    pub fn for_queries() -> Self {
        Self {
            lone_threads: if cores() > 1 { cores() } else { 0 },
            ..Self::for_bulk()
        }
    }

    /// Index builds: one single-threaded session per core, fed length-sorted batches.
    pub fn for_bulk() -> Self {
        Self {
            sessions: cores(),
            intra_threads: 1,
            max_batch: 16,
            lone_threads: 0,
        }
    }
}

/// Where the ONNX Runtime shared library is: `ORT_DYLIB_PATH`, else the set-up cache.
pub fn default_ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cache = std::env::var_os("SIMQ_CACHE")
        .map(PathBuf::from)
        .unwrap_or(home.join(".cache/simq"));
    cache.join("ort/1.31.1/libonnxruntime.so.1.31.1")
}

/// ONNX Runtime allows one environment per process: load the library once, share it.
fn ort_environment(library: &Path) -> Result<ort::environment::Environment> {
    static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> =
        OnceLock::new();
    let env = ENV.get_or_init(|| {
        if !library.is_file() {
            return Err(format!(
                "ONNX Runtime library {} does not exist: run scripts/setup.sh ort, or set ORT_DYLIB_PATH",
                library.display()
            ));
        }
        let builder = ort::init_from(library).map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", library.display()))?;
        builder.with_name("simq").build().map_err(|e| format!("cannot start ONNX Runtime: {e}"))
    });
    env.clone().map_err(|reason| Error::Runtime { reason })
}

/// One tokenised text: ids and token types, unpadded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
}

/// Does the graph have what the runtime feeds and reads: inputs `input_ids` and
/// `attention_mask`, the manifest's output? Returns whether it also takes `token_type_ids`.
fn check_graph(session: &Session, model: &ModelDir) -> Result<bool> {
    let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
    let outputs: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    let refuse = |reason: String| Error::ModelFile {
        path: model.onnx_path(),
        reason,
    };
    for required in ["input_ids", "attention_mask"] {
        if !inputs.contains(&required) {
            return Err(refuse(format!(
                "the graph has no input {required:?} (its inputs: {inputs:?})"
            )));
        }
    }
    let output = model.manifest.onnx_output.as_str();
    if !outputs.contains(&output) {
        return Err(refuse(format!(
            "the graph has no output {output:?}, which simq-model.json names (its outputs: {outputs:?})"
        )));
    }
    Ok(inputs.contains(&"token_type_ids"))
}

/// A loaded model, ready to embed.
pub struct Embedder {
    model: ModelDir,
    tokenizer: Tokenizer,
    sessions: Vec<Mutex<Session>>,
    next_session: AtomicUsize,
    /// Runs calls with fewer texts than `sessions` (see [`RuntimeOptions::lone_threads`]).
    lone: Option<Mutex<Session>>,
    options: RuntimeOptions,
    pad_id: i64,
    /// The graph takes `token_type_ids` (BERT exports do; some sentence-transformers
    /// exports take only ids and mask).
    takes_type_ids: bool,
}

impl Embedder {
    /// Load the model directory into `options.sessions` ONNX sessions.
    pub fn load(ort_library: &Path, model_dir: &Path, options: RuntimeOptions) -> Result<Self> {
        let model = ModelDir::open(model_dir)?;
        let env = ort_environment(ort_library)?;
        let mut tokenizer =
            Tokenizer::from_file(model.tokenizer_path()).map_err(|e| Error::ModelFile {
                path: model.tokenizer_path(),
                reason: format!("not a tokenizer: {e}"),
            })?;
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id as i64)
            .unwrap_or(0);
        // Padding is ours to do per length bucket; the shipped tokenizer pads to a fixed 128.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: model.manifest.max_tokens,
                ..Default::default()
            }))
            .map_err(|e| Error::ModelFile {
                path: model.tokenizer_path(),
                reason: format!("cannot set truncation: {e}"),
            })?;
        let options = RuntimeOptions {
            sessions: options.sessions.max(1),
            intra_threads: options.intra_threads.max(1),
            max_batch: options.max_batch.max(1),
            // A lone session is only of use beside several sessions.
            lone_threads: if options.sessions > 1 {
                options.lone_threads
            } else {
                0
            },
        };
        let session = |threads: usize| {
            Session::builder(&env)
                .and_then(|b| Ok(b.with_optimization_level(GraphOptimizationLevel::All)?))
                .and_then(|b| Ok(b.with_intra_threads(threads)?))
                // Intra-op threads spin between the parallel sections of one run (a
                // sleeping helper thread is woken for each of them: single-query p50
                // 4.2-4.4 against 5.1-5.7 ms, embedder/BENCH.md) but stop when the run
                // ends, so that no idle session spins on the cores the shards and the
                // balancer need next (spinning idle cost 9.8 against 8.5 ms of CPU per
                // text under load). Single-threaded sessions have no helper threads.
                .and_then(|b| Ok(b.with_intra_op_spinning(threads > 1)?))
                .and_then(|b| Ok(b.with_config_entry("session.force_spinning_stop", "1")?))
                .and_then(|mut b| b.commit_from_file(model.onnx_path()))
                .map(Mutex::new)
                .map_err(|e| Error::ModelFile {
                    path: model.onnx_path(),
                    reason: format!("ONNX Runtime cannot load it: {e}"),
                })
        };
        let sessions = (0..options.sessions)
            .map(|_| session(options.intra_threads))
            .collect::<Result<Vec<_>>>()?;
        let lone = match options.lone_threads {
            0 => None,
            threads => Some(session(threads)?),
        };
        let takes_type_ids = check_graph(&sessions[0].lock().unwrap(), &model)?;
        Ok(Self {
            model,
            tokenizer,
            sessions,
            next_session: AtomicUsize::new(0),
            lone,
            options,
            pad_id,
            takes_type_ids,
        })
    }

    /// Content address of the model files; index generations record it.
    pub fn model_id(&self) -> &str {
        &self.model.model_id
    }

    pub fn dims(&self) -> usize {
        self.model.manifest.dims
    }

    pub fn model(&self) -> &ModelDir {
        &self.model
    }

    pub fn options(&self) -> RuntimeOptions {
        self.options
    }

    /// Calls that may run at once without asking for more threads than the layout has:
    /// one per session. A call on the lone session uses a thread per core, so it counts
    /// as all of them (see [`Embedder::lone_fits`]).
    pub fn parallel_calls(&self) -> usize {
        self.sessions.len()
    }

    /// Whether a call of `texts` texts may run on the lone session: there is one and the
    /// texts are too few to split over the single-threaded sessions.
    pub fn lone_fits(&self, texts: usize) -> bool {
        self.lone.is_some() && texts < self.sessions.len()
    }

    /// Tokenise texts (with the model's query prefix), truncated, unpadded.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Tokens>> {
        let prefix = &self.model.manifest.query_prefix;
        let inputs: Vec<String> = texts.iter().map(|t| format!("{prefix}{t}")).collect();
        // `encode_batch` hands the texts to rayon's pool and blocks until its threads are
        // done: for a query or a few that is a wake-up of another thread (and its idle
        // spinning) on the request's path, for work of tens of microseconds.
        let encodings = if inputs.len() < PARALLEL_TOKENIZE_TEXTS {
            inputs
                .into_iter()
                .map(|text| self.tokenizer.encode(text, true))
                .collect::<tokenizers::Result<Vec<_>>>()
        } else {
            self.tokenizer.encode_batch(inputs, true)
        }
        .map_err(|e| Error::Inference {
            reason: format!("tokenizer: {e}"),
        })?;
        Ok(encodings
            .iter()
            .map(|e| Tokens {
                ids: e.get_ids().iter().map(|&i| i as i64).collect(),
                type_ids: e.get_type_ids().iter().map(|&i| i as i64).collect(),
            })
            .collect())
    }

    /// Embed texts: `texts.len() * dims` floats, row i is the L2-normalised vector of text i.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<f32>> {
        let tokens = self.tokenize(texts)?;
        self.embed_tokens(&tokens)
    }

    /// Embed pre-tokenised texts (see [`Embedder::tokenize`]); a call the lone session
    /// fits runs there.
    pub fn embed_tokens(&self, tokens: &[Tokens]) -> Result<Vec<f32>> {
        self.embed_tokens_on(tokens, true)
    }

    /// [`Embedder::embed_tokens`], on the lone session only if `lone` (the caller knows
    /// nothing else runs) and it fits; otherwise on the single-threaded sessions.
    pub fn embed_tokens_on(&self, tokens: &[Tokens], lone: bool) -> Result<Vec<f32>> {
        let dims = self.dims();
        let mut out = vec![0f32; tokens.len() * dims];
        if tokens.is_empty() {
            return Ok(out);
        }
        if let Some(lone) = self
            .lone
            .as_ref()
            .filter(|_| lone && self.lone_fits(tokens.len()))
        {
            let rows: Vec<&Tokens> = tokens.iter().collect();
            let mut session = lone.lock().unwrap_or_else(|p| p.into_inner());
            return self.run_batch(&mut session, &rows);
        }
        // Texts sorted by length, cut into the batches that cost least (see
        // [`length_groups`]); every session gets one when there are enough texts. The
        // costliest batches go first, so that the sessions finish close together.
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&i| tokens[i].ids.len());
        let lengths: Vec<usize> = order.iter().map(|&i| tokens[i].ids.len()).collect();
        let mut batches: Vec<&[usize]> = Vec::new();
        let mut rest = order.as_slice();
        for size in length_groups(&lengths, self.options.max_batch, self.sessions.len()) {
            let (batch, tail) = rest.split_at(size);
            batches.push(batch);
            rest = tail;
        }
        let cost = |b: &&[usize]| batch_cost(b.len(), b.last().map_or(0, |&i| tokens[i].ids.len()));
        batches.sort_by_key(|b| std::cmp::Reverse(cost(b)));

        let results: Vec<Mutex<Option<Result<Vec<f32>>>>> =
            batches.iter().map(|_| Mutex::new(None)).collect();
        let next = AtomicUsize::new(0);
        let work = || loop {
            let b = next.fetch_add(1, Ordering::Relaxed);
            let Some(batch) = batches.get(b) else { break };
            let rows: Vec<&Tokens> = batch.iter().map(|&i| &tokens[i]).collect();
            let r = self.with_session(|s| self.run_batch(s, &rows));
            *results[b].lock().unwrap() = Some(r);
        };
        let workers = self.sessions.len().min(batches.len());
        if workers <= 1 {
            work();
        } else {
            std::thread::scope(|scope| {
                for _ in 0..workers {
                    scope.spawn(work);
                }
            });
        }
        for (batch, result) in batches.iter().zip(results) {
            let vectors = result.into_inner().unwrap().expect("every batch ran")?;
            for (row, &i) in batch.iter().enumerate() {
                out[i * dims..(i + 1) * dims]
                    .copy_from_slice(&vectors[row * dims..(row + 1) * dims]);
            }
        }
        Ok(out)
    }

    /// Run `f` on a free session, or wait for the next one in turn.
    fn with_session<T>(&self, f: impl FnOnce(&mut Session) -> T) -> T {
        for s in &self.sessions {
            if let Ok(mut guard) = s.try_lock() {
                return f(&mut guard);
            }
        }
        let i = self.next_session.fetch_add(1, Ordering::Relaxed) % self.sessions.len();
        let mut guard = self.sessions[i].lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    /// One inference over rows padded to the longest row.
    fn run_batch(&self, session: &mut Session, rows: &[&Tokens]) -> Result<Vec<f32>> {
        let n = rows.len();
        let seq = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0).max(1);
        let mut ids = Array2::<i64>::from_elem((n, seq), self.pad_id);
        let mut mask = Array2::<i64>::zeros((n, seq));
        let mut types = Array2::<i64>::zeros((n, seq));
        for (r, row) in rows.iter().enumerate() {
            for (t, (&id, &ty)) in row.ids.iter().zip(&row.type_ids).enumerate() {
                ids[[r, t]] = id;
                mask[[r, t]] = 1;
                types[[r, t]] = ty;
            }
        }
        let inference = |e: ort::Error| Error::Inference {
            reason: e.to_string(),
        };
        let mut inputs = ort::inputs![
            "input_ids" => TensorRef::from_array_view(&ids).map_err(inference)?,
            "attention_mask" => TensorRef::from_array_view(&mask).map_err(inference)?,
        ];
        if self.takes_type_ids {
            inputs.push((
                "token_type_ids".into(),
                TensorRef::from_array_view(&types)
                    .map_err(inference)?
                    .into(),
            ));
        }
        let outputs = session.run(inputs).map_err(inference)?;
        let name = &self.model.manifest.onnx_output;
        let hidden = outputs
            .get(name.as_str())
            .ok_or_else(|| Error::Inference {
                reason: format!("model has no output named {name:?}"),
            })?
            .try_extract_array::<f32>()
            .map_err(inference)?;
        let shape = hidden.shape().to_vec();
        let dims = self.dims();
        if shape.len() != 3 || shape[0] != n || shape[2] != dims {
            return Err(Error::Inference {
                reason: format!("output {name} has shape {shape:?}, expected [{n}, {seq}, {dims}]"),
            });
        }
        let mut out = vec![0f32; n * dims];
        for r in 0..n {
            let v = &mut out[r * dims..(r + 1) * dims];
            match self.model.manifest.pooling {
                Pooling::Cls => {
                    for (d, x) in v.iter_mut().enumerate() {
                        *x = hidden[[r, 0, d]];
                    }
                }
                Pooling::Mean => {
                    let len = rows[r].ids.len().max(1);
                    for t in 0..rows[r].ids.len() {
                        for (d, x) in v.iter_mut().enumerate() {
                            *x += hidden[[r, t, d]];
                        }
                    }
                    v.iter_mut().for_each(|x| *x /= len as f32);
                }
            }
            if self.model.manifest.normalize {
                l2_normalize(v);
            }
        }
        Ok(out)
    }
}

/// What one inference call costs beyond its tokens, in tokens: on one thread a call of
/// `n` texts padded to `l` tokens took about 2.5 ms + 0.25 ms x n x l (all-MiniLM-L6-v2
/// int8, `n` 1..16, `l` 8..48, 2026-11-25): the fixed part is reading the weights.
const CALL_COST_TOKENS: usize = 10;

/// The cost of one call of `texts` texts padded to `longest` tokens, in tokens.
fn batch_cost(texts: usize, longest: usize) -> usize {
    CALL_COST_TOKENS + texts * longest
}

/// Cut texts sorted by token count into consecutive batches of at most `max_batch` that
/// cost least in all ([`batch_cost`]: shorter texts are padded to the longest). With at
/// least `min_batches` texts there are at least `min_batches` batches, so that that many
/// sessions share the work. Returns the batch sizes in order. (Even halves of 8
/// concurrent queries' real lengths cost 6.1 ms per text in this model, these batches 5.7.)
pub fn length_groups(sorted_lengths: &[usize], max_batch: usize, min_batches: usize) -> Vec<usize> {
    let n = sorted_lengths.len();
    let max_batch = max_batch.max(1);
    let k = min_batches.clamp(1, n.max(1));
    // best[j][g]: least cost of the first j texts in g batches (g = k: k or more), with
    // where its last batch starts and the batch count before it.
    const NONE: usize = usize::MAX;
    let mut best = vec![vec![(NONE, 0usize, 0usize); k + 1]; n + 1];
    best[0][0].0 = 0;
    for j in 1..=n {
        for i in j.saturating_sub(max_batch)..j {
            let cost = batch_cost(j - i, sorted_lengths[j - 1]);
            for g in 0..=k {
                let before = best[i][g].0;
                let to = (g + 1).min(k);
                if before != NONE && before + cost < best[j][to].0 {
                    best[j][to] = (before + cost, i, g);
                }
            }
        }
    }
    let mut sizes = Vec::new();
    let (mut j, mut g) = (n, k);
    while j > 0 {
        let (_, i, before) = best[j][g];
        sizes.push(j - i);
        (j, g) = (i, before);
    }
    sizes.reverse();
    sizes
}

/// Scale a vector to unit length (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(lengths: &[usize], sizes: &[usize]) -> usize {
        let mut at = 0;
        sizes
            .iter()
            .map(|&n| {
                at += n;
                batch_cost(n, lengths[at - 1])
            })
            .sum()
    }

    /// Every way to cut `n` texts into consecutive batches (n is small).
    fn all_cuts(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        (1..=n)
            .flat_map(|first| {
                all_cuts(n - first).into_iter().map(move |mut rest| {
                    rest.insert(0, first);
                    rest
                })
            })
            .collect()
    }

    #[test]
    fn batches_cost_least_of_every_cut_that_keeps_the_rules() {
        let mut seed = 7u64;
        for case in 0..300 {
            let n = case % 10;
            let mut lengths: Vec<usize> = (0..n)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    5 + (seed >> 33) as usize % 45
                })
                .collect();
            lengths.sort_unstable();
            let (max_batch, min_batches) = (1 + case % 4, 1 + case % 3);
            let sizes = length_groups(&lengths, max_batch, min_batches);
            assert_eq!(sizes.iter().sum::<usize>(), n, "{lengths:?} {sizes:?}");
            assert!(
                sizes.iter().all(|&s| (1..=max_batch).contains(&s)),
                "{sizes:?}"
            );
            assert!(sizes.len() >= min_batches.min(n), "{lengths:?} {sizes:?}");
            let least = all_cuts(n)
                .into_iter()
                .filter(|c| c.iter().all(|&s| s <= max_batch) && c.len() >= min_batches.min(n))
                .map(|c| cost(&lengths, &c))
                .min()
                .unwrap();
            assert_eq!(cost(&lengths, &sizes), least, "{lengths:?} {sizes:?}");
        }
    }

    #[test]
    fn short_and_long_texts_get_their_own_batches_and_equal_ones_share() {
        assert_eq!(length_groups(&[5, 5, 5, 5, 40, 40], 16, 1), vec![4, 2]);
        assert_eq!(length_groups(&[12; 32], 16, 2), vec![16, 16]);
        assert_eq!(
            length_groups(&[12, 12], 16, 2),
            vec![1, 1],
            "both sessions work"
        );
        assert_eq!(length_groups(&[12], 16, 2), vec![1]);
        assert!(length_groups(&[], 16, 2).is_empty());
    }
}
