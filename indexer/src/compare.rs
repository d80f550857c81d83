//! `simq-indexer compare`: the two arms of a traffic split side by side over a time
//! window, read from Prometheus (the balancers' `simq_balancer_arm_*`,
//! `simq_balancer_top_score` and `simq_balancer_shadow_*` series), and a verdict against
//! thresholds. The progressive rollout asks the same verdict at each step.
//!
//! The verdict is a pure function of the numbers ([`verdict`]), so its rules are unit
//! tests; [`fetch`] is the only part that talks to Prometheus.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde_json::Value;

/// What one arm did in the window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ArmStats {
    /// Answers served (ok + degraded) and errors.
    pub answered: f64,
    pub degraded: f64,
    pub errors: f64,
    /// Latency quantiles in seconds of answers not from the cache.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Mean cosine score of the top answer.
    pub top_score: Option<f64>,
}

/// The shadow comparisons of the window: the same queries answered by both arms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowStats {
    pub agree: f64,
    pub differ: f64,
    /// The candidate failed to answer.
    pub failed: f64,
    /// Mean overlap@k of the two result lists.
    pub overlap: Option<f64>,
    /// p99 latency in seconds of each arm on the shadowed queries.
    pub active_p99: Option<f64>,
    pub candidate_p99: Option<f64>,
}

impl ShadowStats {
    pub fn pairs(&self) -> f64 {
        self.agree + self.differ + self.failed
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Comparison {
    pub active: ArmStats,
    pub candidate: ArmStats,
    pub shadow: ShadowStats,
}

/// What the candidate must meet.
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Candidate answers plus shadow pairs needed before anything is judged.
    pub min_samples: f64,
    /// Candidate p99 at most this times the active arm's.
    pub max_p99_ratio: f64,
    /// Share of the candidate's queries (served or shadowed) that failed, at most.
    pub max_error_share: f64,
    /// Share of the candidate's answers that were degraded, at most.
    pub max_degraded_share: f64,
    /// Mean overlap@k with the active arm, at least.
    pub min_overlap: f64,
    /// Share of shadow pairs whose top answers agree, at least.
    pub min_top1: f64,
    /// The candidate's mean top score may be lower than the active arm's by this much.
    pub max_score_drop: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_samples: 20.0,
            max_p99_ratio: 2.0,
            max_error_share: 0.01,
            max_degraded_share: 0.05,
            min_overlap: 0.6,
            min_top1: 0.7,
            max_score_drop: 0.05,
        }
    }
}

/// One line of the verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// The checks of `c` against `t`. A check without the data it needs fails (a promotion
/// must not pass on silence), except the top score, which needs served candidate answers
/// (weight above 0) and is skipped as passed without them.
pub fn verdict(c: &Comparison, t: &Thresholds) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut check = |name, passed, detail: String| {
        checks.push(Check {
            name,
            passed,
            detail,
        })
    };
    let cand = &c.candidate;
    let samples = cand.answered + cand.errors + c.shadow.pairs();
    check(
        "samples",
        samples >= t.min_samples,
        format!(
            "{samples:.0} candidate answers and shadow pairs (need {:.0})",
            t.min_samples
        ),
    );
    let failed = cand.errors + c.shadow.failed;
    let error_share = if samples > 0.0 { failed / samples } else { 0.0 };
    check(
        "errors",
        samples > 0.0 && error_share <= t.max_error_share,
        format!(
            "{:.2} % of the candidate's queries failed (at most {:.2} %)",
            error_share * 100.0,
            t.max_error_share * 100.0
        ),
    );
    if cand.answered > 0.0 {
        let share = cand.degraded / cand.answered;
        check(
            "degraded",
            share <= t.max_degraded_share,
            format!(
                "{:.2} % of the candidate's answers degraded (at most {:.2} %)",
                share * 100.0,
                t.max_degraded_share * 100.0
            ),
        );
    }
    // The same queries on both arms compare best; served answers otherwise.
    let (active_p99, cand_p99, source) = match (c.shadow.active_p99, c.shadow.candidate_p99) {
        (Some(a), Some(b)) => (Some(a), Some(b), "shadowed queries"),
        _ => (c.active.p99, cand.p99, "served answers"),
    };
    match (active_p99, cand_p99) {
        (Some(a), Some(b)) => check(
            "latency",
            b <= a * t.max_p99_ratio,
            format!(
                "p99 {:.1} ms against {:.1} ms on {source} (at most {:.1}x)",
                b * 1000.0,
                a * 1000.0,
                t.max_p99_ratio
            ),
        ),
        _ => check("latency", false, "no latency of both arms yet".into()),
    }
    let answered_pairs = c.shadow.agree + c.shadow.differ;
    match c.shadow.overlap {
        Some(o) if answered_pairs > 0.0 => check(
            "overlap",
            o >= t.min_overlap,
            format!(
                "mean overlap@k {o:.3} over {answered_pairs:.0} shadow pairs (at least {:.3})",
                t.min_overlap
            ),
        ),
        _ => check("overlap", false, "no shadow comparisons yet".into()),
    }
    if answered_pairs > 0.0 {
        let top1 = c.shadow.agree / answered_pairs;
        check(
            "top1",
            top1 >= t.min_top1,
            format!(
                "top answers agree on {:.1} % of shadow pairs (at least {:.1} %)",
                top1 * 100.0,
                t.min_top1 * 100.0
            ),
        );
    } else {
        check("top1", false, "no shadow comparisons yet".into());
    }
    match (c.active.top_score, cand.top_score) {
        (Some(a), Some(b)) => check(
            "top_score",
            b >= a - t.max_score_drop,
            format!(
                "mean top score {b:.3} against {a:.3} (at most {:.3} lower)",
                t.max_score_drop
            ),
        ),
        _ => check(
            "top_score",
            true,
            "skipped: no served answers of both arms".into(),
        ),
    }
    checks
}

/// The comparison table for people.
pub fn table(c: &Comparison) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.1} ms", s * 1000.0));
    let num = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{s:.3}"));
    let row = |name: &str, a: &ArmStats| {
        format!(
            "{name:<10} {:>9.0} {:>9.0} {:>8.0} {:>10} {:>10} {:>9}\n",
            a.answered,
            a.degraded,
            a.errors,
            ms(a.p50),
            ms(a.p99),
            num(a.top_score)
        )
    };
    let mut out = format!(
        "{:<10} {:>9} {:>9} {:>8} {:>10} {:>10} {:>9}\n",
        "arm", "answered", "degraded", "errors", "p50", "p99", "top score"
    );
    out.push_str(&row("active", &c.active));
    out.push_str(&row("candidate", &c.candidate));
    let s = &c.shadow;
    out.push_str(&format!(
        "shadow: {:.0} pairs ({:.0} top answers agree, {:.0} differ, {:.0} candidate failed), mean overlap@k {}, p99 {} active / {} candidate\n",
        s.pairs(),
        s.agree,
        s.differ,
        s.failed,
        num(s.overlap),
        ms(s.active_p99),
        ms(s.candidate_p99)
    ));
    out
}

/// One instant vector from Prometheus's `/api/v1/query` answer: (labels, value), NaN and
/// infinite values left out.
pub fn parse_vector(body: &Value) -> anyhow::Result<Vec<(BTreeMap<String, String>, f64)>> {
    if body["status"] != "success" {
        return Err(anyhow!(
            "Prometheus refused the query: {}",
            body["error"].as_str().unwrap_or("no error text")
        ));
    }
    let result = body["data"]["result"]
        .as_array()
        .ok_or_else(|| anyhow!("Prometheus answered without data.result"))?;
    let mut out = Vec::new();
    for r in result {
        let labels = r["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let value: f64 = r["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("a sample without a value: {r}"))?;
        if value.is_finite() {
            out.push((labels, value));
        }
    }
    Ok(out)
}

/// Ask Prometheus at `base` (e.g. http://127.0.0.1:9090) for the comparison over the
/// last `window`.
pub async fn fetch(base: &str, window: Duration) -> anyhow::Result<Comparison> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let w = format!("{}s", window.as_secs().max(1));
    let query = |q: String| {
        let http = http.clone();
        async move {
            let url = format!("{}/api/v1/query", base.trim_end_matches('/'));
            let body: Value = http
                .get(&url)
                .query(&[("query", q.as_str())])
                .send()
                .await
                .with_context(|| format!("asking Prometheus at {url}"))?
                .json()
                .await
                .with_context(|| format!("reading Prometheus's answer to {q}"))?;
            parse_vector(&body).with_context(|| q.clone())
        }
    };
    let by = |rows: &[(BTreeMap<String, String>, f64)], label: &str, value: &str| {
        rows.iter()
            .filter(|(l, _)| l.get(label).map(String::as_str) == Some(value))
            .map(|(_, v)| *v)
            .sum::<f64>()
            // increase() can come out as a tiny negative number (-0 in print).
            .max(0.0)
    };
    let one = |rows: &[(BTreeMap<String, String>, f64)], label: &str, value: &str| {
        rows.iter()
            .find(|(l, _)| l.get(label).map(String::as_str) == Some(value))
            .map(|(_, v)| *v)
    };
    let answers = query(format!(
        "sum by (arm, outcome) (increase(simq_balancer_arm_answers_total[{w}]))"
    ))
    .await?;
    let quantile = |q: f64, metric: &str| {
        query(format!(
            "histogram_quantile({q}, sum by (le, arm) (rate({metric}_bucket[{w}])))"
        ))
    };
    let p50 = quantile(0.5, "simq_balancer_arm_seconds").await?;
    let p99 = quantile(0.99, "simq_balancer_arm_seconds").await?;
    let shadow_p99 = quantile(0.99, "simq_balancer_shadow_seconds").await?;
    let scores = query(format!(
        "sum by (arm) (increase(simq_balancer_top_score_sum[{w}])) / sum by (arm) (increase(simq_balancer_top_score_count[{w}]))"
    ))
    .await?;
    let pairs = query(format!(
        "sum by (outcome) (increase(simq_balancer_shadow_pairs_total[{w}]))"
    ))
    .await?;
    let overlap = query(format!(
        "sum(increase(simq_balancer_shadow_overlap_ratio_sum[{w}])) / sum(increase(simq_balancer_shadow_overlap_ratio_count[{w}]))"
    ))
    .await?;
    let arm = |name: &str| {
        let outcome = |o: &str| {
            answers
                .iter()
                .filter(|(l, _)| {
                    l.get("arm").map(String::as_str) == Some(name)
                        && l.get("outcome").map(String::as_str) == Some(o)
                })
                .map(|(_, v)| *v)
                .sum::<f64>()
                .max(0.0)
        };
        ArmStats {
            answered: outcome("ok") + outcome("degraded"),
            degraded: outcome("degraded"),
            errors: outcome("error"),
            p50: one(&p50, "arm", name),
            p99: one(&p99, "arm", name),
            top_score: one(&scores, "arm", name),
        }
    };
    Ok(Comparison {
        active: arm("active"),
        candidate: arm("candidate"),
        shadow: ShadowStats {
            agree: by(&pairs, "outcome", "agree"),
            differ: by(&pairs, "outcome", "differ"),
            failed: by(&pairs, "outcome", "failed"),
            overlap: overlap.first().map(|(_, v)| *v),
            active_p99: one(&shadow_p99, "arm", "active"),
            candidate_p99: one(&shadow_p99, "arm", "candidate"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Comparison {
        let arm = |answered, p99, score| ArmStats {
            answered,
            degraded: 0.0,
            errors: 0.0,
            p50: Some(p99 / 2.0),
            p99: Some(p99),
            top_score: Some(score),
        };
        Comparison {
            active: arm(400.0, 0.020, 0.90),
            candidate: arm(100.0, 0.024, 0.89),
            shadow: ShadowStats {
                agree: 90.0,
                differ: 10.0,
                failed: 0.0,
                overlap: Some(0.85),
                active_p99: Some(0.020),
                candidate_p99: Some(0.022),
            },
        }
    }

    fn failed(c: &Comparison) -> Vec<&'static str> {
        verdict(c, &Thresholds::default())
            .into_iter()
            .filter(|c| !c.passed)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_candidate_like_the_active_dg_passes() {
        assert!(
            failed(&good()).is_empty(),
            "{:?}",
            verdict(&good(), &Thresholds::default())
        );
    }

    #[test]
    fn each_threshold_fails_its_own_check() {
        let mut c = good();
        c.shadow.overlap = Some(0.3);
        assert_eq!(failed(&c), vec!["overlap"]);
        let mut c = good();
        (c.shadow.agree, c.shadow.differ) = (40.0, 60.0);
        assert_eq!(failed(&c), vec!["top1"]);
        let mut c = good();
        c.shadow.candidate_p99 = Some(0.050);
        assert_eq!(failed(&c), vec!["latency"]);
        let mut c = good();
        c.candidate.errors = 5.0;
        assert_eq!(failed(&c), vec!["errors"]);
        let mut c = good();
        c.candidate.degraded = 10.0;
        assert_eq!(failed(&c), vec!["degraded"]);
        let mut c = good();
        c.candidate.top_score = Some(0.80);
        assert_eq!(failed(&c), vec!["top_score"]);
    }

    #[test]
    fn silence_never_passes() {
        let none = Comparison::default();
        assert_eq!(
            failed(&none),
            vec!["samples", "errors", "latency", "overlap", "top1"]
        );
        // Shadow only (weight 0): judged on the shadow pairs, the top score skipped.
        let mut c = good();
        c.candidate = ArmStats::default();
        assert!(failed(&c).is_empty(), "{:?}", failed(&c));
    }

    #[test]
    fn prometheus_vectors_parse_and_errors_name_the_problem() {
        let body: Value = serde_json::json!({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"arm": "active"}, "value": [1.0, "0.25"]},
            {"metric": {"arm": "candidate"}, "value": [1.0, "NaN"]}
        ]}});
        let v = parse_vector(&body).unwrap();
        assert_eq!(v.len(), 1, "NaN left out");
        assert_eq!((v[0].0["arm"].as_str(), v[0].1), ("active", 0.25));
        let bad: Value = serde_json::json!({"status": "error", "error": "parse error at char 3"});
        assert!(parse_vector(&bad)
            .unwrap_err()
            .to_string()
            .contains("parse error"));
    }
}
