//! The traffic split at the balancer: which arm answers a query (sticky per user, see
//! [`simq_contract::traffic`]), and the shadow comparison that also asks the candidate
//! without changing the answer.

use simq_contract::traffic::{arm_of, overlap_at_k};
use simq_contract::Arm;

use crate::metrics::Metrics;
use crate::query::Answer;
use crate::request::{ApiError, ApiErrorKind, QueryRequest};
use crate::state::{Candidate, Routing};

/// The header naming the user a query is from (sticky arm assignment).
pub const USER_HEADER: &str = "x-user-id";
/// Longest user id accepted in [`USER_HEADER`].
pub const MAX_USER_ID_BYTES: usize = 256;

/// Who a query is from, for the split: the [`USER_HEADER`] value, else the API key id,
/// else the normalised query text (the same question always lands on the same arm).
/// A header that is not UTF-8 text of at most [`MAX_USER_ID_BYTES`] is a 400.
pub fn user_of(
    header: Option<&http::HeaderValue>,
    key_id: Option<&str>,
    req: &QueryRequest,
) -> Result<String, ApiError> {
    if let Some(v) = header {
        let bad = |why: &str| {
            ApiError::new(
                ApiErrorKind::BadUserId,
                format!("the {USER_HEADER} header {why}"),
            )
        };
        let text = v.to_str().map_err(|_| bad("is not visible ASCII text"))?;
        let text = text.trim();
        if text.is_empty() {
            return Err(bad("is empty"));
        }
        if text.len() > MAX_USER_ID_BYTES {
            return Err(bad(&format!(
                "has {} bytes; at most {MAX_USER_ID_BYTES}",
                text.len()
            )));
        }
        return Ok(format!("user:{text}"));
    }
    Ok(match key_id {
        Some(id) => format!("key:{id}"),
        None => format!("query:{}", req.normalized()),
    })
}

/// The arm that answers `user` and its routing: the candidate when a ready candidate's
/// split sends this user there, else the active dg.
pub fn choose<'a>(
    active: &'a Routing,
    candidate: Option<&'a Candidate>,
    user: &str,
) -> (Arm, &'a Routing) {
    match candidate {
        Some(c)
            if arm_of(&c.split.salt, user, c.split.weight) == Arm::Candidate
                && c.not_ready(active).is_none() =>
        {
            (Arm::Candidate, &c.routing)
        }
        _ => (Arm::Active, active),
    }
}

/// Record an answer's arm metrics: outcome, and for answers not from the cache, time and
/// top score.
pub fn record_answer(metrics: &Metrics, arm: Arm, result: &Result<Answer, ApiError>) {
    let outcome = match result {
        Ok(a) if a.degraded => "degraded",
        Ok(_) => "ok",
        Err(_) => "error",
    };
    metrics
        .arm_answers
        .with_label_values(&[arm.as_str(), outcome])
        .inc();
    if let Some(a) = result.as_ref().ok().filter(|a| !a.cached) {
        metrics
            .arm_seconds
            .with_label_values(&[arm.as_str()])
            .observe(a.took_ms / 1000.0);
        if let Some(score) = a.score {
            metrics
                .top_score
                .with_label_values(&[arm.as_str()])
                .observe(score as f64);
        }
    }
}

/// Record one shadow comparison: the active answer against what the candidate said.
pub fn record_shadow(metrics: &Metrics, active: &Answer, candidate: &Result<Answer, ApiError>) {
    let Ok(c) = candidate else {
        metrics.shadow_pairs.with_label_values(&["failed"]).inc();
        return;
    };
    let k = active.results.len().max(c.results.len());
    let (overlap, top_agrees) = overlap_at_k(texts(active), texts(c), k);
    metrics
        .shadow_pairs
        .with_label_values(&[if top_agrees { "agree" } else { "differ" }])
        .inc();
    metrics.shadow_overlap.observe(overlap);
    for (arm, a) in [(Arm::Active, active), (Arm::Candidate, c)] {
        metrics
            .shadow_seconds
            .with_label_values(&[arm.as_str()])
            .observe(a.took_ms / 1000.0);
    }
}

/// The result texts of an answer, best first.
fn texts(a: &Answer) -> Vec<&str> {
    a.results.iter().map(|r| r.text.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use simq_consul::ServiceEntry;
    use simq_contract::TrafficSplit;

    use super::*;
    use crate::query::ResultRow;
    use crate::state::{build_routing, routing_for, Parts};
    use crate::testing::two_shard_index;

    fn entry(id: &str, tags: Vec<String>) -> ServiceEntry {
        ServiceEntry {
            id: id.into(),
            name: "x".into(),
            node: "n1".into(),
            address: "127.0.0.1".into(),
            port: 1,
            tags,
            meta: Default::default(),
            status: "passing".into(),
        }
    }

    /// The active routing (model-a) and a candidate (model-b) of `weight`, with a
    /// replica for each of the candidate's shards when `candidate_healthy`.
    fn arms(weight: f64, candidate_healthy: bool) -> (Routing, Candidate) {
        let (a, c) = (two_shard_index("model-a"), two_shard_index("model-b"));
        let shards = |dg: &str| -> Vec<ServiceEntry> {
            (0..2)
                .map(|n| {
                    entry(
                        &format!("{dg}-{n}"),
                        vec![format!("dg={dg}"), format!("shard={n}")],
                    )
                })
                .collect()
        };
        let mut parts = Parts {
            active: Some(a.clone()),
            candidate: None,
            embedders: vec![
                entry("ea", vec!["model=model-a".into()]),
                entry("eb", vec!["model=model-b".into()]),
            ],
            shards: shards(&a.manifest.dg),
        };
        if candidate_healthy {
            parts.shards.extend(shards(&c.manifest.dg));
        }
        let mut channels = HashMap::new();
        let active = build_routing(&parts, &mut channels).unwrap();
        let candidate = Candidate {
            split: TrafficSplit {
                candidate: c.manifest.dg.clone(),
                weight,
                shadow: 0.0,
                salt: "exp".into(),
                set_at: "t".into(),
            },
            routing: routing_for(&c, &parts, &mut channels),
        };
        (active, candidate)
    }

    #[tokio::test]
    async fn the_split_sends_the_weight_of_users_to_a_ready_candidate_only() {
        let (active, candidate) = arms(0.2, true);
        let users: Vec<String> = (0..5000).map(|i| format!("user:{i}")).collect();
        let on = |c: Option<&Candidate>| {
            users
                .iter()
                .filter(|u| choose(&active, c, u).0 == Arm::Candidate)
                .count() as f64
                / users.len() as f64
        };
        let share = on(Some(&candidate));
        assert!((share - 0.2).abs() < 0.02, "{share}");
        let user = users
            .iter()
            .find(|u| choose(&active, Some(&candidate), u).0 == Arm::Candidate)
            .unwrap();
        assert_eq!(
            choose(&active, Some(&candidate), user).1.manifest.dg,
            candidate.split.candidate,
            "the candidate's own routing"
        );
        assert_eq!(on(None), 0.0, "no split, no candidate traffic");
        let (active, unhealthy) = arms(0.2, false);
        assert!(users
            .iter()
            .all(|u| choose(&active, Some(&unhealthy), u).0 == Arm::Active));
    }

    #[test]
    fn the_user_is_the_header_else_the_key_else_the_query() {
        let req = QueryRequest {
            query: "How  Are you".into(),
            k: 3,
            timeout: None,
        };
        let h = http::HeaderValue::from_static(" u-1 ");
        assert_eq!(user_of(Some(&h), Some("k1"), &req).unwrap(), "user:u-1");
        assert_eq!(user_of(None, Some("k1"), &req).unwrap(), "key:k1");
        assert_eq!(user_of(None, None, &req).unwrap(), "query:how are you");
        let long = http::HeaderValue::from_str(&"x".repeat(300)).unwrap();
        let e = user_of(Some(&long), None, &req).unwrap_err();
        assert_eq!((e.status(), e.kind), (400, ApiErrorKind::BadUserId));
        let blank = http::HeaderValue::from_static("  ");
        assert_eq!(
            user_of(Some(&blank), None, &req).unwrap_err().kind,
            ApiErrorKind::BadUserId
        );
    }

    #[test]
    fn shadow_comparisons_record_overlap_agreement_and_both_latencies() {
        let m = Metrics::new().unwrap();
        let answer = |texts: &[&str], ms: f64| Answer {
            query: "q".into(),
            similar: texts.first().map(|t| t.to_string()),
            score: Some(0.9),
            results: texts
                .iter()
                .map(|t| ResultRow {
                    text: t.to_string(),
                    score: 0.9,
                    shard: 0,
                })
                .collect(),
            dg: "dg".into(),
            arm: Arm::Active,
            took_ms: ms,
            contour: crate::query::Contour::Model,
            degraded: false,
            notes: vec![],
            cached: false,
        };
        record_shadow(&m, &answer(&["a", "b"], 4.0), &Ok(answer(&["a", "c"], 8.0)));
        record_shadow(&m, &answer(&["a", "b"], 4.0), &Ok(answer(&["b", "a"], 8.0)));
        record_shadow(
            &m,
            &answer(&["a"], 4.0),
            &Err(ApiError::new(ApiErrorKind::NoShard, "x")),
        );
        let pairs = |o: &str| m.shadow_pairs.with_label_values(&[o]).get();
        assert_eq!(
            (pairs("agree"), pairs("differ"), pairs("failed")),
            (1, 1, 1)
        );
        assert_eq!(m.shadow_overlap.get_sample_count(), 2);
        assert!((m.shadow_overlap.get_sample_sum() - 1.5).abs() < 1e-9);
        let secs = |arm: &str| m.shadow_seconds.with_label_values(&[arm]).get_sample_sum();
        assert!((secs("active") - 0.008).abs() < 1e-9 && (secs("candidate") - 0.016).abs() < 1e-9);
    }
}
