//! API keys and per-key rate limits at the balancer (`--api-keys required`).
//!
//! Keys are created with `simq-indexer keys create`; Consul KV holds one record per key
//! (its SHA-256, never the key; see `simq_contract::apikeys`) and the balancer follows the
//! records with a blocking query ([`crate::watch`]). A query needs a valid key in
//! `Authorization: Bearer <key>` or `X-Api-Key: <key>`: without one `401`, beyond the
//! key's rate `429` with `Retry-After` (a token bucket per key and balancer). `/metrics`
//! and `/v1/status` on the public port need a key made with `--admin`; on the instance's
//! own `--admin-listen` port (Consul checks, Prometheus) they stay open, as does
//! `/health` everywhere. Logs and metrics name the key id, never the key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use simq_contract::apikeys::{self, ApiKeyRecord};
use simq_contract::Record;

use crate::request::{ApiError, ApiErrorKind};

/// Whether the balancer asks for API keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Every endpoint is open (the quick local set-up).
    Off,
    /// Queries need a key; /metrics and /v1/status on the public port an admin key.
    Required,
}

/// A token bucket: `burst` queries at once, refilled at `rate` per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        Self {
            rate,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    /// Take one token, or say how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

/// Which kind of endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `POST /v1/query`: any valid key, counted against its rate.
    Query,
    /// `/metrics`, `/v1/status` on the public port: an admin key.
    Admin,
}

struct Entry {
    record: ApiKeyRecord,
    bucket: Arc<Mutex<TokenBucket>>,
}

/// The keys the balancer knows, as last read from Consul.
#[derive(Default)]
pub struct KeyTable {
    keys: HashMap<String, Entry>,
    /// KV entries that could not be used, each naming its key and the reason.
    rejected: Vec<String>,
}

pub struct Auth {
    pub mode: Mode,
    table: RwLock<KeyTable>,
}

impl Auth {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            table: RwLock::new(KeyTable::default()),
        }
    }

    /// Replace the key table with the KV entries under the keys prefix (`(key, value)`).
    /// Unusable entries are left out and listed; a key whose record did not change keeps
    /// its bucket (a Consul update must not refill everybody's rate).
    pub fn load(&self, entries: &[(String, Vec<u8>)]) {
        let mut next = KeyTable::default();
        let old = self.table.read().expect("key table lock");
        for (kv_key, value) in entries {
            let record = match ApiKeyRecord::decode(kv_key, value) {
                Ok(r) => r,
                Err(e) => {
                    next.rejected.push(e.to_string());
                    continue;
                }
            };
            if !kv_key.ends_with(&format!("/{}", record.id)) {
                next.rejected.push(format!(
                    "{kv_key}: record id {} differs from its key",
                    record.id
                ));
                continue;
            }
            let bucket = match old.keys.get(&record.id) {
                Some(e) if e.record == record => e.bucket.clone(),
                _ => Arc::new(Mutex::new(TokenBucket::new(
                    record.rate,
                    record.burst,
                    Instant::now(),
                ))),
            };
            next.keys
                .insert(record.id.clone(), Entry { record, bucket });
        }
        drop(old);
        for r in &next.rejected {
            tracing::warn!(entry = %r, "API key record skipped");
        }
        *self.table.write().expect("key table lock") = next;
    }

    /// Keys in use and entries skipped (for /v1/status and the gauge).
    pub fn counts(&self) -> (usize, Vec<String>) {
        let t = self.table.read().expect("key table lock");
        (t.keys.len(), t.rejected.clone())
    }

    /// May this request go on? `Ok(Some(id))` names the key that was used, `Ok(None)`
    /// when keys are off. `presented` is the key as sent (see [`presented_key`]).
    pub fn check(
        &self,
        presented: Option<&str>,
        access: Access,
        now: Instant,
    ) -> Result<Option<String>, ApiError> {
        if self.mode == Mode::Off {
            return Ok(None);
        }
        let unauthorized = |kind, msg: &str| Err(ApiError::new(kind, msg));
        let Some(key) = presented else {
            return unauthorized(
                ApiErrorKind::MissingApiKey,
                "this balancer needs an API key: send it as \"Authorization: Bearer <key>\" or \"X-Api-Key: <key>\" (simq-indexer keys create makes one)",
            );
        };
        let invalid = "the API key is unknown, revoked or wrong";
        let Some(id) = apikeys::key_id(key) else {
            return unauthorized(
                ApiErrorKind::InvalidApiKey,
                "the API key is malformed (expected simq_<8 hex>_<32 hex>)",
            );
        };
        let table = self.table.read().expect("key table lock");
        let Some(entry) = table.keys.get(id) else {
            return unauthorized(ApiErrorKind::InvalidApiKey, invalid);
        };
        if !apikeys::matches(key, &entry.record.sha256) {
            return unauthorized(ApiErrorKind::InvalidApiKey, invalid);
        }
        match access {
            Access::Admin if !entry.record.admin => Err(ApiError::new(
                ApiErrorKind::Forbidden,
                format!(
                    "key {id} may query but not read /metrics or /v1/status on this port (make an admin key with keys create --admin)"
                ),
            )),
            Access::Admin => Ok(Some(id.to_string())),
            Access::Query => {
                let waited = entry.bucket.lock().expect("bucket lock").take(now);
                match waited {
                    Ok(()) => Ok(Some(id.to_string())),
                    Err(wait) => Err(ApiError::new(
                        ApiErrorKind::RateLimited,
                        format!(
                            "key {id} is over its rate of {} queries/s (burst {}); retry in {} ms",
                            entry.record.rate,
                            entry.record.burst,
                            wait.as_millis().max(1)
                        ),
                    )
                    .with_retry_after(wait.as_secs_f64().ceil().max(1.0) as u32)),
                }
            }
        }
    }
}

/// The key a request carries: `Authorization: Bearer <key>` or `X-Api-Key: <key>`.
pub fn presented_key(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, key) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| key.trim());
    }
    headers.get("x-api-key")?.to_str().ok().map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;
    use simq_contract::apikeys::{hash_key, key_from_bytes};

    fn record(key: &str, rate: f64, burst: u32, admin: bool) -> (String, Vec<u8>) {
        let r = ApiKeyRecord {
            id: apikeys::key_id(key).unwrap().to_string(),
            label: "test".into(),
            sha256: hash_key(key),
            created_at: "2026-11-24T00:00:00Z".into(),
            rate,
            burst,
            admin,
        };
        (
            format!("simq/keys/{}", r.id),
            serde_json::to_vec(&r).unwrap(),
        )
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 3, t0);
        for _ in 0..3 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.take(t0 + Duration::from_millis(499)).is_err());
        assert!(b.take(t0 + Duration::from_millis(1000)).is_ok());
        // Idle time refills at most to the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.take(later).is_ok());
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn off_lets_everything_through() {
        let auth = Auth::new(Mode::Off);
        assert_eq!(auth.check(None, Access::Admin, Instant::now()), Ok(None));
    }

    #[test]
    fn required_refuses_missing_malformed_unknown_and_wrong_keys_with_401() {
        let auth = Auth::new(Mode::Required);
        let key = key_from_bytes([1, 2, 3, 4], [9; 16]);
        auth.load(&[record(&key, 10.0, 10, false)]);
        let now = Instant::now();
        let kind = |k: Option<&str>| {
            let e = auth.check(k, Access::Query, now).unwrap_err();
            (e.status(), e.kind)
        };
        assert_eq!(kind(None), (401, ApiErrorKind::MissingApiKey));
        assert_eq!(kind(Some("hunter2")), (401, ApiErrorKind::InvalidApiKey));
        let unknown = key_from_bytes([4, 3, 2, 1], [9; 16]);
        assert_eq!(kind(Some(&unknown)), (401, ApiErrorKind::InvalidApiKey));
        let wrong_secret = key_from_bytes([1, 2, 3, 4], [8; 16]);
        assert_eq!(
            kind(Some(&wrong_secret)),
            (401, ApiErrorKind::InvalidApiKey)
        );
        assert_eq!(
            auth.check(Some(&key), Access::Query, now),
            Ok(Some("01020304".into()))
        );
        // Revoked: the record is gone from KV.
        auth.load(&[]);
        assert_eq!(kind(Some(&key)), (401, ApiErrorKind::InvalidApiKey));
    }

    #[test]
    fn over_the_rate_answers_429_with_retry_after_and_admin_needs_an_admin_key() {
        let auth = Auth::new(Mode::Required);
        let user = key_from_bytes([1, 1, 1, 1], [1; 16]);
        let admin = key_from_bytes([2, 2, 2, 2], [2; 16]);
        auth.load(&[record(&user, 0.5, 2, false), record(&admin, 1.0, 1, true)]);
        let now = Instant::now();
        assert!(auth.check(Some(&user), Access::Query, now).is_ok());
        assert!(auth.check(Some(&user), Access::Query, now).is_ok());
        let e = auth.check(Some(&user), Access::Query, now).unwrap_err();
        assert_eq!(
            (e.status(), e.kind, e.retry_after),
            (429, ApiErrorKind::RateLimited, Some(2))
        );
        let e = auth.check(Some(&user), Access::Admin, now).unwrap_err();
        assert_eq!((e.status(), e.kind), (403, ApiErrorKind::Forbidden));
        assert!(auth.check(Some(&admin), Access::Admin, now).is_ok());
        // Reading the same records again keeps the spent buckets.
        auth.load(&[record(&user, 0.5, 2, false), record(&admin, 1.0, 1, true)]);
        assert_eq!(
            auth.check(Some(&user), Access::Query, now)
                .unwrap_err()
                .kind,
            ApiErrorKind::RateLimited
        );
    }

    #[test]
    fn unusable_records_are_skipped_and_named() {
        let auth = Auth::new(Mode::Required);
        let good = key_from_bytes([1, 2, 3, 4], [9; 16]);
        let (_, value) = record(&good, 1.0, 1, false);
        auth.load(&[
            ("simq/keys/01020304".into(), value.clone()),
            ("simq/keys/ffffffff".into(), value),
            ("simq/keys/garbage".into(), b"{not json".to_vec()),
        ]);
        let (n, rejected) = auth.counts();
        assert_eq!(n, 1);
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected[0].starts_with("simq/keys/ffffffff: record id 01020304"));
        assert!(rejected[1].starts_with("simq/keys/garbage is not an API key record"));
    }

    #[test]
    fn keys_are_read_from_bearer_or_x_api_key() {
        let mut h = http::HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("x-api-key", "simq_k".parse().unwrap());
        assert_eq!(presented_key(&h), Some("simq_k"));
        h.insert("authorization", "Bearer  simq_b ".parse().unwrap());
        assert_eq!(presented_key(&h), Some("simq_b"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(presented_key(&h), None);
    }
}

/// Hostile input: any header value and any KV bytes are refused or used, never a panic.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn any_presented_key_is_refused_with_401_unless_it_is_real(key in any::<String>()) {
            let auth = Auth::new(Mode::Required);
            match auth.check(Some(&key), Access::Query, Instant::now()) {
                Ok(_) => prop_assert!(false, "an unknown key passed"),
                Err(e) => prop_assert_eq!(e.status(), 401),
            }
        }

        #[test]
        fn any_kv_bytes_are_skipped_or_used(values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8)) {
            let auth = Auth::new(Mode::Required);
            let entries: Vec<(String, Vec<u8>)> = values
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("simq/keys/{i:08x}"), v))
                .collect();
            auth.load(&entries);
            let (valid, rejected) = auth.counts();
            prop_assert_eq!(valid + rejected.len(), entries.len());
        }
    }
}
