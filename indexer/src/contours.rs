//! `indexer contours`: how good the light contour is. Queries are perturbed duplicates of
//! stored questions (a typo, a dropped word, two words swapped, all lower case), and a
//! query is found when its original comes first (top-1) or among the first five (top-5).
//! Both contours answer the same queries: the model (embed, probe the `nprobe` nearest
//! clusters as the balancer does, merge) and the lexical one (BM25 on every shard, merge).
//! Each query's time is measured on one thread, so it is also its CPU time.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use simq_embedder::runtime::Embedder;

use crate::eval::{sample, DgDir};

/// How a stored question is changed into a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Perturbation {
    /// Two neighbouring letters of one word swapped.
    Typo,
    /// One word left out.
    DropWord,
    /// Two neighbouring words swapped.
    SwapWords,
    /// The whole text in lower case, punctuation dropped.
    LowerCase,
}

pub const PERTURBATIONS: [Perturbation; 4] = [
    Perturbation::Typo,
    Perturbation::DropWord,
    Perturbation::SwapWords,
    Perturbation::LowerCase,
];

/// `text` changed by `kind`; None when the text is too short for it (or unchanged).
pub fn perturb(text: &str, kind: Perturbation, rng: &mut StdRng) -> Option<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let out = match kind {
        Perturbation::Typo => {
            let long: Vec<usize> = (0..words.len())
                .filter(|&i| words[i].chars().filter(|c| c.is_alphabetic()).count() >= 4)
                .collect();
            let &w = long.get(rng.random_range(0..long.len().max(1)))?;
            let mut chars: Vec<char> = words[w].chars().collect();
            let at = rng.random_range(0..chars.len() - 1);
            chars.swap(at, at + 1);
            let typo: String = chars.into_iter().collect();
            let mut words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
            words[w] = typo;
            words.join(" ")
        }
        Perturbation::DropWord if words.len() >= 4 => {
            let mut words = words.clone();
            words.remove(rng.random_range(0..words.len()));
            words.join(" ")
        }
        Perturbation::SwapWords if words.len() >= 3 => {
            let mut words = words.clone();
            let at = rng.random_range(0..words.len() - 1);
            words.swap(at, at + 1);
            words.join(" ")
        }
        Perturbation::LowerCase => text
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || c.is_whitespace())
            .collect::<String>()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        _ => return None,
    };
    (out != text && !out.trim().is_empty()).then_some(out)
}

/// One row of the comparison: one perturbation, both contours.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ContourRow {
    pub perturbation: Perturbation,
    pub queries: usize,
    pub model_top1: f64,
    pub model_top5: f64,
    pub lexical_top1: f64,
    pub lexical_top5: f64,
    /// Mean time of one query: embedding, routing and the shard searches.
    pub model_ms: f64,
    /// Mean time of one query: a BM25 search on every shard.
    pub lexical_ms: f64,
}

/// Compare both contours on `samples` stored questions per perturbation.
pub fn compare(
    dg: &DgDir,
    embedder: &Embedder,
    samples: usize,
    nprobe: usize,
    seed: u64,
) -> anyhow::Result<Vec<ContourRow>> {
    let items = dg.items()?;
    let chosen = sample(&items, samples);
    let mut rows = Vec::new();
    for kind in PERTURBATIONS {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut m1, mut m5, mut l1, mut l5, mut n) = (0, 0, 0, 0, 0);
        let (mut model_s, mut lexical_s) = (0.0, 0.0);
        for item in &chosen {
            let Some(text) = dg.shards[item.shard].text(item.id)? else {
                continue;
            };
            let Some(query) = perturb(&text, kind, &mut rng) else {
                continue;
            };
            n += 1;
            let t = Instant::now();
            let vector = embedder.embed(&[&query])?;
            let plan = dg.map.plan(&vector, nprobe, |_| true);
            let mut found = Vec::new();
            for (s, clusters) in &plan.shards {
                found.extend(dg.shards[*s as usize].search(&vector, 5, clusters)?);
            }
            found.sort_by(|a, b| b.score.total_cmp(&a.score));
            model_s += t.elapsed().as_secs_f64();
            let (top1, top5) = rank_of(found.iter().map(|h| h.id), item.id);
            (m1, m5) = (m1 + top1, m5 + top5);

            let t = Instant::now();
            let mut found = Vec::new();
            for shard in &dg.shards {
                found.extend(shard.lexical_search(&query, 5)?);
            }
            found.sort_by(|a, b| b.score.total_cmp(&a.score));
            lexical_s += t.elapsed().as_secs_f64();
            let (top1, top5) = rank_of(found.iter().map(|h| h.id), item.id);
            (l1, l5) = (l1 + top1, l5 + top5);
        }
        let share = |x: usize| x as f64 / n.max(1) as f64;
        rows.push(ContourRow {
            perturbation: kind,
            queries: n,
            model_top1: share(m1),
            model_top5: share(m5),
            lexical_top1: share(l1),
            lexical_top5: share(l5),
            model_ms: model_s * 1000.0 / n.max(1) as f64,
            lexical_ms: lexical_s * 1000.0 / n.max(1) as f64,
        });
    }
    Ok(rows)
}

/// (1 when `id` comes first, 1 when it is among the first five) of a ranked list.
fn rank_of(ranked: impl Iterator<Item = u32>, id: u32) -> (usize, usize) {
    match ranked.take(5).position(|x| x == id) {
        Some(0) => (1, 1),
        Some(_) => (0, 1),
        None => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_perturbation_changes_the_text_as_named() {
        let mut rng = StdRng::seed_from_u64(1);
        let text = "How do I reset my Wireless router?";
        let typo = perturb(text, Perturbation::Typo, &mut rng).unwrap();
        assert_eq!(typo.split(' ').count(), 7);
        assert_ne!(typo, text);
        let mut a: Vec<char> = typo.chars().collect();
        let mut b: Vec<char> = text.chars().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "a typo swaps letters, it adds or loses none");
        let dropped = perturb(text, Perturbation::DropWord, &mut rng).unwrap();
        assert_eq!(dropped.split(' ').count(), 6);
        let swapped = perturb(text, Perturbation::SwapWords, &mut rng).unwrap();
        let mut w1: Vec<&str> = swapped.split(' ').collect();
        let mut w2: Vec<&str> = text.split(' ').collect();
        w1.sort();
        w2.sort();
        assert_eq!(w1, w2);
        assert_eq!(
            perturb(text, Perturbation::LowerCase, &mut rng).unwrap(),
            "how do i reset my wireless router"
        );
        assert_eq!(perturb("hi there", Perturbation::DropWord, &mut rng), None);
        assert_eq!(perturb("a b", Perturbation::Typo, &mut rng), None);
    }

    #[test]
    fn the_rank_counts_first_place_and_the_first_five() {
        assert_eq!(rank_of([7, 1, 2].into_iter(), 7), (1, 1));
        assert_eq!(rank_of([1, 2, 3, 4, 7].into_iter(), 7), (0, 1));
        assert_eq!(rank_of([1, 2, 3, 4, 5, 7].into_iter(), 7), (0, 0));
    }
}
