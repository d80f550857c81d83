//! Traffic split between the active dg and a candidate: the KV record (`<prefix>traffic`,
//! one CAS-written key) and the one rule that assigns a user to an arm.
//!
//! A user is on the candidate arm when the first 8 bytes of `sha256(salt NUL user)`, read as
//! a fraction of 2^64, are below the weight. The same user with the same salt always gets
//! the same arm; raising the weight only moves users from active to candidate (never
//! back); a new salt draws every user again, independently of the last experiment.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::kv::is_dg_name;

/// Longest salt accepted (it is hashed with every query's user).
pub const MAX_SALT_LEN: usize = 128;

/// The split as stored in Consul KV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSplit {
    /// The dg that gets a share of the traffic besides the active one.
    pub candidate: String,
    /// Share of users (0 to 1) answered by the candidate.
    pub weight: f64,
    /// Share of the active arm's queries (0 to 1) also sent to the candidate to compare,
    /// without changing the answer.
    #[serde(default)]
    pub shadow: f64,
    /// Mixed into every user's hash: a new salt is a new experiment.
    pub salt: String,
    /// RFC 3339 time the split was written.
    pub set_at: String,
}

impl TrafficSplit {
    /// Check what a reader relies on; the message names the field.
    pub fn validate(&self) -> Result<(), crate::Invalid> {
        if !is_dg_name(&self.candidate) {
            return Err(format!(
                "candidate {:?} is not a dg id (dg- and 16 lowercase hex digits)",
                self.candidate
            )
            .into());
        }
        for (name, v) in [("weight", self.weight), ("shadow", self.shadow)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} is {v}; must be between 0 and 1").into());
            }
        }
        if self.salt.is_empty() || self.salt.len() > MAX_SALT_LEN {
            return Err(format!(
                "salt has {} bytes; must have 1 to {MAX_SALT_LEN}",
                self.salt.len()
            )
            .into());
        }
        Ok(())
    }
}

/// Which dg answered a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arm {
    Active,
    Candidate,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Active => "active",
            Arm::Candidate => "candidate",
        }
    }
}

/// Where `user` falls in `[0, 1)` under `salt`: uniform over users, fixed per (salt, user).
pub fn draw(salt: &str, user: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(salt.as_bytes());
    h.update([0u8]);
    h.update(user.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // 53 bits: exactly representable in an f64.
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64
}

/// The arm of `user` when a share `weight` of users goes to the candidate.
pub fn arm_of(salt: &str, user: &str, weight: f64) -> Arm {
    if draw(salt, user) < weight {
        Arm::Candidate
    } else {
        Arm::Active
    }
}

/// Is this query also sent to the candidate as a shadow? Drawn from the query text under
/// its own salt, so the shadowed queries are independent of the users' arms.
pub fn shadowed(salt: &str, query: &str, share: f64) -> bool {
    draw(&format!("{salt}/shadow"), query) < share
}

/// The share of `a`'s first `k` results that are also in `b`'s first `k` (by text), and
/// whether their first results agree. Two empty lists agree fully.
pub fn overlap_at_k<'a>(
    a: impl IntoIterator<Item = &'a str>,
    b: impl IntoIterator<Item = &'a str>,
    k: usize,
) -> (f64, bool) {
    let a: Vec<&str> = a.into_iter().take(k).collect();
    let b: Vec<&str> = b.into_iter().take(k).collect();
    let top_agrees = a.first() == b.first();
    let denominator = a.len().max(b.len());
    if denominator == 0 {
        return (1.0, true);
    }
    let common = a.iter().filter(|t| b.contains(t)).count();
    (common as f64 / denominator as f64, top_agrees)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user-{i}")).collect()
    }

    #[test]
    fn the_share_of_users_on_the_candidate_is_the_weight() {
        // 10,000 users: the binomial standard deviation at 0.2 is 0.004; allow 3.75 of them.
        let users = users(10_000);
        for weight in [0.05, 0.2, 0.5] {
            let on = users
                .iter()
                .filter(|u| arm_of("exp-1", u, weight) == Arm::Candidate)
                .count();
            let share = on as f64 / users.len() as f64;
            assert!(
                (share - weight).abs() < 0.015,
                "weight {weight}: share {share}"
            );
        }
    }

    #[test]
    fn a_user_keeps_the_arm_and_a_higher_weight_only_adds_users() {
        for u in users(2000) {
            let at_20 = arm_of("exp-1", &u, 0.2);
            assert_eq!(at_20, arm_of("exp-1", &u, 0.2), "same user, same arm");
            if at_20 == Arm::Candidate {
                assert_eq!(arm_of("exp-1", &u, 0.5), Arm::Candidate);
            }
        }
        assert!(users(100)
            .iter()
            .all(|u| arm_of("s", u, 0.0) == Arm::Active && arm_of("s", u, 1.0) == Arm::Candidate));
    }

    #[test]
    fn another_salt_reassigns_users_independently() {
        // Independent draws: P(candidate under both) = 0.2 * 0.2 = 0.04 (sd 0.002 at 10,000).
        let users = users(10_000);
        let both = users
            .iter()
            .filter(|u| {
                arm_of("exp-1", u, 0.2) == Arm::Candidate
                    && arm_of("exp-2", u, 0.2) == Arm::Candidate
            })
            .count() as f64
            / users.len() as f64;
        assert!((both - 0.04).abs() < 0.008, "{both}");
    }

    #[test]
    fn shadow_draws_are_their_own() {
        let qs = users(10_000);
        let shadowed_share =
            qs.iter().filter(|q| shadowed("exp-1", q, 0.3)).count() as f64 / qs.len() as f64;
        assert!((shadowed_share - 0.3).abs() < 0.015, "{shadowed_share}");
        assert!(qs.iter().all(|q| !shadowed("exp-1", q, 0.0)));
    }

    #[test]
    fn overlap_counts_common_texts_of_the_first_k() {
        assert_eq!(
            overlap_at_k(["a", "b", "c"], ["a", "c", "d"], 3),
            (2.0 / 3.0, true)
        );
        assert_eq!(overlap_at_k(["a", "b"], ["b", "a"], 2), (1.0, false));
        assert_eq!(
            overlap_at_k(["a", "b", "x"], ["a", "b", "y"], 2),
            (1.0, true)
        );
        assert_eq!(overlap_at_k(["a"], [], 10), (0.0, false));
        assert_eq!(overlap_at_k([], [], 10), (1.0, true));
    }

    #[test]
    fn splits_are_checked() {
        let good = TrafficSplit {
            candidate: "dg-0123456789abcdef".into(),
            weight: 0.2,
            shadow: 0.0,
            salt: "exp-1".into(),
            set_at: "2026-11-24T00:00:00Z".into(),
        };
        assert!(good.validate().is_ok());
        let bad = |f: fn(&mut TrafficSplit)| {
            let mut s = good.clone();
            f(&mut s);
            s.validate().unwrap_err().0
        };
        assert!(bad(|s| s.candidate = "../x".into()).contains("candidate"));
        assert!(bad(|s| s.weight = 1.5).contains("weight"));
        assert!(bad(|s| s.shadow = f64::NAN).contains("shadow"));
        assert!(bad(|s| s.salt.clear()).contains("salt"));
        let unknown =
            r#"{"candidate":"dg-0123456789abcdef","weight":0.1,"salt":"s","set_at":"","wieght":1}"#;
        assert!(serde_json::from_str::<TrafficSplit>(unknown)
            .unwrap_err()
            .to_string()
            .contains("wieght"));
    }
}
