//! The light contour: a BM25 index of a shard's texts, answered without the model.
//!
//! When no embedder can answer in time (all down, ejected, or the model's line past the
//! deadline) the balancer asks every shard for the best lexical matches of the query text
//! instead and marks the answer `"contour": "lexical"`. The index lives in the shard file
//! itself (the `lexical` database, written by `indexer build`), so it is content-addressed
//! and verified with the shard, and canaries, rollback and traffic splits cover it.
//!
//! Scores are BM25 (k1 1.2, b 0.75) with the statistics of the whole dg (document count,
//! mean length, and each term's document frequency over every shard), so the hits of
//! different shards compare and merge like cosine scores do.
//!
//! Layout: term (lower-cased alphanumeric run) -> [`encode_postings`]: the term's dg-wide
//! document frequency (u32 LE), then one (item id u32, term frequency u16, item length u16)
//! per item of this shard holding it, by id, all little-endian.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// BM25 term-frequency saturation.
pub const K1: f32 = 1.2;
/// BM25 length normalisation.
pub const B: f32 = 0.75;
/// Longer tokens are cut to this many bytes (at a char boundary): LMDB keys are bounded.
pub const MAX_TERM_BYTES: usize = 64;
/// Terms of one query used at most (the rarest first), so no query costs without bound.
pub const MAX_QUERY_TERMS: usize = 32;
/// A term held by more than this share of the dg's texts ("what", "how", "the") is only
/// scored when the query has no rarer term: its postings are the longest to read and its
/// weight (idf) the smallest. Measured on the full corpus (`simq-indexer contours`,
/// indexer/BENCH.md): scoring every term cost 3.5-5.0 ms per query, a share of 0.2 cost
/// 1.4-2.0 ms, 0.05 cost 0.37-0.52 ms (a tenth of the model path) for 1-4 points of top-1.
pub const COMMON_TERM_SHARE: f64 = 0.05;
const POSTING_BYTES: usize = 8;

/// The terms of `text`: lower-cased runs of letters and digits, in order.
pub fn tokens(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(|t| {
            let mut t = t.to_lowercase();
            if t.len() > MAX_TERM_BYTES {
                let mut cut = MAX_TERM_BYTES;
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                t.truncate(cut);
            }
            t
        })
        .collect()
}

/// The dg-wide statistics BM25 needs, computed once over every text of the dg.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CorpusStats {
    pub docs: u64,
    pub total_terms: u64,
    /// Documents holding each term.
    pub df: HashMap<String, u32>,
}

impl CorpusStats {
    pub fn from_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut stats = Self::default();
        for text in texts {
            let terms = tokens(text);
            stats.docs += 1;
            stats.total_terms += terms.len() as u64;
            let mut seen: Vec<&String> = terms.iter().collect();
            seen.sort();
            seen.dedup();
            for t in seen {
                *stats.df.entry(t.clone()).or_default() += 1;
            }
        }
        stats
    }

    /// The statistics a dg's shard files were written with: `meta` (the same in every
    /// file) and the document frequencies of each file's terms (`dfs`, over every file).
    /// Inverse of [`Self::meta`] and the `df` written with each term's postings.
    pub fn from_written(meta: LexicalMeta, dfs: impl IntoIterator<Item = (String, u32)>) -> Self {
        Self {
            docs: meta.docs,
            total_terms: (meta.mean_terms * meta.docs as f64).round() as u64,
            df: dfs.into_iter().collect(),
        }
    }

    /// These statistics, frozen, for a dg that adds `texts` to the one they describe:
    /// terms they already know keep their numbers (so shard files that do not change keep
    /// their bytes, and every shard of the new dg scores with the same numbers); a term
    /// only the new texts hold gets its document frequency among them. Document count and
    /// mean length stay: for a change of a few per cent they move BM25 scores by about as
    /// much, and a larger change is a full rebuild (the indexer's drift guard).
    pub fn extended_by<'a>(&self, texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut out = self.clone();
        let new = Self::from_texts(texts);
        for (term, df) in new.df {
            out.df.entry(term).or_insert(df);
        }
        out
    }

    /// What the shard file's meta keeps of these statistics.
    pub fn meta(&self) -> LexicalMeta {
        LexicalMeta {
            docs: self.docs,
            mean_terms: if self.docs == 0 {
                0.0
            } else {
                self.total_terms as f64 / self.docs as f64
            },
        }
    }
}

/// The dg-wide numbers a shard needs at query time (in the shard file's meta).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LexicalMeta {
    pub docs: u64,
    pub mean_terms: f64,
}

/// One item's entry in a term's postings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posting {
    pub id: u32,
    pub tf: u16,
    pub len: u16,
}

/// The postings of each term over `items` (id, text), by term then id.
pub fn postings<'a>(
    items: impl IntoIterator<Item = (u32, &'a str)>,
) -> BTreeMap<String, Vec<Posting>> {
    let mut out: BTreeMap<String, Vec<Posting>> = BTreeMap::new();
    for (id, text) in items {
        let terms = tokens(text);
        let len = terms.len().min(u16::MAX as usize) as u16;
        let mut counts: BTreeMap<&str, u16> = BTreeMap::new();
        for t in &terms {
            let c = counts.entry(t).or_default();
            *c = c.saturating_add(1);
        }
        for (t, tf) in counts {
            out.entry(t.to_string())
                .or_default()
                .push(Posting { id, tf, len });
        }
    }
    for list in out.values_mut() {
        list.sort_by_key(|p| p.id);
    }
    out
}

/// A term's value in the `lexical` database.
pub fn encode_postings(df: u32, postings: &[Posting]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + postings.len() * POSTING_BYTES);
    out.extend_from_slice(&df.to_le_bytes());
    for p in postings {
        out.extend_from_slice(&p.id.to_le_bytes());
        out.extend_from_slice(&p.tf.to_le_bytes());
        out.extend_from_slice(&p.len.to_le_bytes());
    }
    out
}

/// (dg-wide document frequency, postings) of an [`encode_postings`] value; None when the
/// bytes are not one.
pub fn decode_postings(bytes: &[u8]) -> Option<(u32, impl Iterator<Item = Posting> + '_)> {
    if bytes.len() < 4 || !(bytes.len() - 4).is_multiple_of(POSTING_BYTES) {
        return None;
    }
    let df = u32::from_le_bytes(bytes[..4].try_into().ok()?);
    let postings = bytes[4..].chunks_exact(POSTING_BYTES).map(|c| Posting {
        id: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        tf: u16::from_le_bytes([c[4], c[5]]),
        len: u16::from_le_bytes([c[6], c[7]]),
    });
    Some((df, postings))
}

/// BM25 inverse document frequency (the non-negative form).
pub fn idf(docs: u64, df: u32) -> f32 {
    let (n, df) = (docs as f32, df as f32);
    (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
}

/// One term's BM25 contribution for an item.
pub fn term_score(idf: f32, p: Posting, mean_terms: f32) -> f32 {
    let tf = p.tf as f32;
    let norm = 1.0 - B + B * p.len as f32 / mean_terms.max(1.0);
    idf * tf * (K1 + 1.0) / (tf + K1 * norm)
}

/// The best `k` (id, BM25 score) for `query`, best first (ties by id), reading each term's
/// postings through `lookup` (None: the term is in no item of this shard).
pub fn search<'b>(
    query: &str,
    k: usize,
    meta: LexicalMeta,
    mut lookup: impl FnMut(&str) -> Option<&'b [u8]>,
) -> Vec<(u32, f32)> {
    let mut terms = tokens(query);
    terms.sort();
    terms.dedup();
    let mut lists: Vec<(u32, &[u8])> = terms
        .iter()
        .filter_map(|t| lookup(t))
        .filter_map(|bytes| decode_postings(bytes).map(|(df, _)| (df, bytes)))
        .collect();
    // The rarest terms carry the most weight; a query of many words keeps the rarest, and
    // one with a rare term drops the very common ones.
    lists.sort_by_key(|(df, _)| *df);
    lists.truncate(MAX_QUERY_TERMS);
    let common = (meta.docs as f64 * COMMON_TERM_SHARE) as u32;
    if lists.first().is_some_and(|(df, _)| *df <= common) {
        lists.retain(|(df, _)| *df <= common);
    }
    let mut scores: HashMap<u32, f32> = HashMap::new();
    for (df, bytes) in lists {
        let idf = idf(meta.docs, df);
        let Some((_, postings)) = decode_postings(bytes) else {
            continue;
        };
        for p in postings {
            *scores.entry(p.id).or_default() += term_score(idf, p, meta.mean_terms as f32);
        }
    }
    let mut ranked: Vec<(u32, f32)> = scores.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(k);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_read_back_from_what_shard_files_keep_are_the_ones_written() {
        let texts = [
            "how to cook rice",
            "how to boil an egg",
            "Rice or pasta?",
            "why",
        ];
        let stats = CorpusStats::from_texts(texts);
        let back = CorpusStats::from_written(stats.meta(), stats.df.clone());
        assert_eq!(back, stats);
        assert_eq!(back.meta(), stats.meta());
    }

    #[test]
    fn extended_statistics_keep_known_terms_and_count_new_ones_among_the_new_texts() {
        let stats = CorpusStats::from_texts(["how to cook rice", "how to boil an egg"]);
        let more = stats.extended_by(["how to fry an egg", "fry tofu", "rice noodles"]);
        assert_eq!(
            (more.docs, more.total_terms),
            (stats.docs, stats.total_terms)
        );
        assert_eq!(more.df["how"], 2, "a known term keeps its frequency");
        assert_eq!(more.df["rice"], 1);
        assert_eq!(
            more.df["fry"], 2,
            "a new term: documents among the new texts"
        );
        assert_eq!(more.df["tofu"], 1);
        assert_eq!(more.meta(), stats.meta());
    }

    #[test]
    fn tokens_are_lower_cased_alphanumeric_runs() {
        assert_eq!(
            tokens("How do I reset my iPhone's PIN-code? (r2)"),
            ["how", "do", "i", "reset", "my", "iphone", "s", "pin", "code", "r2"]
        );
        assert_eq!(tokens("Ünïcode straße"), ["ünïcode", "straße"]);
        assert!(tokens(" ,.; ").is_empty());
        let long = "é".repeat(100);
        assert!(tokens(&long)[0].len() <= MAX_TERM_BYTES);
    }

    #[test]
    fn postings_round_trip_through_their_bytes() {
        let ps = vec![
            Posting {
                id: 3,
                tf: 1,
                len: 4,
            },
            Posting {
                id: 70_000,
                tf: 2,
                len: 9,
            },
        ];
        let bytes = encode_postings(17, &ps);
        let (df, back) = decode_postings(&bytes).unwrap();
        assert_eq!(df, 17);
        assert_eq!(back.collect::<Vec<_>>(), ps);
        assert!(
            decode_postings(&bytes[..7]).is_none(),
            "a cut value is refused"
        );
    }

    fn index(texts: &[&str]) -> (LexicalMeta, BTreeMap<String, Vec<u8>>) {
        let stats = CorpusStats::from_texts(texts.iter().copied());
        let lists = postings(texts.iter().enumerate().map(|(i, t)| (i as u32, *t)));
        let encoded = lists
            .iter()
            .map(|(t, ps)| (t.clone(), encode_postings(stats.df[t], ps)))
            .collect();
        (stats.meta(), encoded)
    }

    #[test]
    fn the_text_sharing_the_rarest_words_ranks_first() {
        let texts = [
            "how do i learn python",
            "how do i learn to cook rice",
            "what is the capital of france",
            "how do i reset my router",
        ];
        let (meta, db) = index(&texts);
        let hits = search("reset router how", 3, meta, |t| {
            db.get(t).map(Vec::as_slice)
        });
        assert_eq!(hits[0].0, 3);
        let hits = search("Capital of FRANCE?", 1, meta, |t| {
            db.get(t).map(Vec::as_slice)
        });
        assert_eq!(hits, vec![(2, hits[0].1)]);
        assert!(search("zebra", 3, meta, |t| db.get(t).map(Vec::as_slice)).is_empty());
    }

    #[test]
    fn dg_wide_statistics_make_one_shards_scores_those_of_the_whole() {
        // The same item scores the same whether its shard holds the others or not.
        let texts = ["rust borrow checker", "rust compiler error", "python error"];
        let stats = CorpusStats::from_texts(texts.iter().copied());
        let whole = postings(texts.iter().enumerate().map(|(i, t)| (i as u32, *t)));
        let alone = postings([(0, texts[0])]);
        let enc = |l: &BTreeMap<String, Vec<Posting>>| -> BTreeMap<String, Vec<u8>> {
            l.iter()
                .map(|(t, ps)| (t.clone(), encode_postings(stats.df[t], ps)))
                .collect()
        };
        let (whole, alone) = (enc(&whole), enc(&alone));
        let a = search("rust borrow", 1, stats.meta(), |t| {
            whole.get(t).map(Vec::as_slice)
        });
        let b = search("rust borrow", 1, stats.meta(), |t| {
            alone.get(t).map(Vec::as_slice)
        });
        assert_eq!(a, b);
    }

    #[test]
    fn very_common_words_count_only_when_the_query_has_nothing_rarer() {
        // "how" is in every text: beside "router" it is skipped, alone it still ranks.
        let mut texts: Vec<String> = (0..40).map(|i| format!("how to item{i}")).collect();
        texts.push("how to reset the router".into());
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (meta, db) = index(&refs);
        let hits = search("how router", 3, meta, |t| db.get(t).map(Vec::as_slice));
        assert_eq!(hits.len(), 1, "only the text with the rare word: {hits:?}");
        assert_eq!(hits[0].0, 40);
        let hits = search("how to", 3, meta, |t| db.get(t).map(Vec::as_slice));
        assert_eq!(hits.len(), 3, "common words alone still answer");
    }

    #[test]
    fn idf_is_positive_and_falls_with_document_frequency() {
        assert!(idf(100, 1) > idf(100, 10));
        assert!(idf(100, 100) > 0.0);
    }
}
