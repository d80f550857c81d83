//! Flipping the active dg: one check-and-set write of `<prefix>active`. Idempotent (a flip
//! to the dg already active changes nothing) and race-safe (of two concurrent flips from
//! the same state exactly one wins; the other gets [`FlipError::LostRace`]).

use simq_consul::{ConsulClient, KvPair};
use simq_contract::Record;
use simq_contract::{ActiveDg, KvLayout};

/// The two KV operations a flip needs: the seam that lets the race rules below be
/// unit-tested against an in-memory store. [`ConsulClient`] is the real one.
#[allow(async_fn_in_trait)] // used through generics only, never as dyn or across threads
pub trait PointerKv {
    async fn get(&self, key: &str) -> simq_consul::Result<Option<KvPair>>;
    /// Write `value` only if the key's modify index is still `modify_index` (0: only if
    /// the key does not exist); false when another write came first.
    async fn cas(&self, key: &str, value: &[u8], modify_index: u64) -> simq_consul::Result<bool>;
}

impl PointerKv for ConsulClient {
    async fn get(&self, key: &str) -> simq_consul::Result<Option<KvPair>> {
        Ok(self.kv_get(key, None).await?.value)
    }
    async fn cas(&self, key: &str, value: &[u8], modify_index: u64) -> simq_consul::Result<bool> {
        self.kv_cas(key, value, modify_index).await
    }
}

/// The active pointer as read, with the index a CAS write must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub active: Option<ActiveDg>,
    /// Modify index of the key, 0 when it does not exist (CAS 0 = create only).
    pub modify_index: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FlipError {
    #[error("dg {dg} is not published: {key} does not exist (run `simq-indexer publish` first)")]
    NotPublished { dg: String, key: String },
    #[error("another flip won the race: the active dg is now {now}; nothing was changed")]
    LostRace { now: String },
    #[error("{0}")]
    Consul(#[from] simq_consul::Error),
    /// The pointer's key holds something that is not a valid active pointer.
    #[error("{0}")]
    Corrupt(#[from] simq_contract::Invalid),
}

/// Outcome of a flip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flipped {
    /// The pointer now names the dg (and the one it replaced as previous).
    Now(ActiveDg),
    /// It already named the dg; nothing was written.
    AlreadyActive(ActiveDg),
}

pub async fn observe(consul: &impl PointerKv, layout: &KvLayout) -> Result<Observed, FlipError> {
    let key = layout.active();
    match consul.get(&key).await? {
        None => Ok(Observed {
            active: None,
            modify_index: 0,
        }),
        Some(kv) => {
            let active = ActiveDg::decode(&key, &kv.value)?;
            Ok(Observed {
                active: Some(active),
                modify_index: kv.modify_index,
            })
        }
    }
}

/// Write `dg` as active if the pointer is still what `observed` saw: one CAS write.
pub async fn flip_from(
    consul: &impl PointerKv,
    layout: &KvLayout,
    observed: &Observed,
    dg: &str,
) -> Result<Flipped, FlipError> {
    if let Some(current) = &observed.active {
        if current.dg == dg {
            return Ok(Flipped::AlreadyActive(current.clone()));
        }
    }
    let manifest_key = layout.manifest(dg);
    if consul.get(&manifest_key).await?.is_none() {
        return Err(FlipError::NotPublished {
            dg: dg.to_string(),
            key: manifest_key,
        });
    }
    let next = ActiveDg {
        dg: dg.to_string(),
        previous: observed.active.as_ref().map(|a| a.dg.clone()),
        flipped_at: now_rfc3339(),
    };
    let bytes = serde_json::to_vec(&next).expect("pointer serialises");
    if consul
        .cas(&layout.active(), &bytes, observed.modify_index)
        .await?
    {
        Ok(Flipped::Now(next))
    } else {
        let now = observe(consul, layout)
            .await?
            .active
            .map(|a| a.dg)
            .unwrap_or_else(|| "(none)".into());
        Err(FlipError::LostRace { now })
    }
}

/// Read the pointer and flip it to `dg`.
pub async fn flip(
    consul: &impl PointerKv,
    layout: &KvLayout,
    dg: &str,
) -> Result<Flipped, FlipError> {
    let observed = observe(consul, layout).await?;
    flip_from(consul, layout, &observed, dg).await
}

/// UTC now as RFC 3339 with seconds, without a date crate.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Consul KV's check-and-set rules in memory: every write bumps a global index.
    #[derive(Default)]
    struct MemKv(Mutex<Entries>);

    /// The last index written, and each key's value with its modify index.
    type Entries = (u64, BTreeMap<String, (Vec<u8>, u64)>);

    impl MemKv {
        fn put(&self, key: &str, value: &[u8]) {
            let mut g = self.0.lock().unwrap();
            g.0 += 1;
            let index = g.0;
            g.1.insert(key.into(), (value.to_vec(), index));
        }
    }

    impl PointerKv for MemKv {
        async fn get(&self, key: &str) -> simq_consul::Result<Option<KvPair>> {
            let g = self.0.lock().unwrap();
            Ok(g.1.get(key).map(|(value, index)| KvPair {
                key: key.into(),
                value: value.clone(),
                modify_index: *index,
                session: None,
            }))
        }
        async fn cas(&self, key: &str, value: &[u8], index: u64) -> simq_consul::Result<bool> {
            let now = self
                .0
                .lock()
                .unwrap()
                .1
                .get(key)
                .map(|(_, i)| *i)
                .unwrap_or(0);
            if now != index {
                return Ok(false);
            }
            self.put(key, value);
            Ok(true)
        }
    }

    fn published(dgs: &[&str]) -> (MemKv, KvLayout) {
        let (kv, layout) = (MemKv::default(), KvLayout::new("simq/"));
        for dg in dgs {
            kv.put(&layout.manifest(dg), b"{}");
        }
        (kv, layout)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn of_two_flips_from_the_same_state_one_wins_and_the_other_names_the_winner() {
        let (kv, layout) = published(&[
            "dg-aaaaaaaaaaaaaaaa",
            "dg-bbbbbbbbbbbbbbbb",
            "dg-cccccccccccccccc",
        ]);
        block_on(async {
            flip(&kv, &layout, "dg-aaaaaaaaaaaaaaaa").await.unwrap();
            let seen = observe(&kv, &layout).await.unwrap();
            let won = flip_from(&kv, &layout, &seen, "dg-bbbbbbbbbbbbbbbb")
                .await
                .unwrap();
            assert!(
                matches!(&won, Flipped::Now(a) if a.dg == "dg-bbbbbbbbbbbbbbbb" && a.previous.as_deref() == Some("dg-aaaaaaaaaaaaaaaa"))
            );
            match flip_from(&kv, &layout, &seen, "dg-cccccccccccccccc").await {
                Err(FlipError::LostRace { now }) => assert_eq!(now, "dg-bbbbbbbbbbbbbbbb"),
                other => panic!("expected a lost race, got {other:?}"),
            }
            // The loser changed nothing.
            let after = observe(&kv, &layout).await.unwrap().active.unwrap();
            assert_eq!(
                (after.dg.as_str(), after.previous.as_deref()),
                ("dg-bbbbbbbbbbbbbbbb", Some("dg-aaaaaaaaaaaaaaaa"))
            );
        });
    }

    #[test]
    fn the_first_flip_creates_the_pointer_only_if_nobody_else_did() {
        let (kv, layout) = published(&["dg-aaaaaaaaaaaaaaaa", "dg-bbbbbbbbbbbbbbbb"]);
        block_on(async {
            let empty = observe(&kv, &layout).await.unwrap();
            assert_eq!((empty.active.as_ref(), empty.modify_index), (None, 0));
            flip_from(&kv, &layout, &empty, "dg-aaaaaaaaaaaaaaaa")
                .await
                .unwrap();
            assert!(matches!(
                flip_from(&kv, &layout, &empty, "dg-bbbbbbbbbbbbbbbb").await,
                Err(FlipError::LostRace { now }) if now == "dg-aaaaaaaaaaaaaaaa"
            ));
        });
    }

    #[test]
    fn a_flip_to_the_active_dg_writes_nothing_and_an_unpublished_dg_is_refused() {
        let (kv, layout) = published(&["dg-aaaaaaaaaaaaaaaa"]);
        block_on(async {
            flip(&kv, &layout, "dg-aaaaaaaaaaaaaaaa").await.unwrap();
            let index = observe(&kv, &layout).await.unwrap().modify_index;
            assert!(matches!(
                flip(&kv, &layout, "dg-aaaaaaaaaaaaaaaa").await,
                Ok(Flipped::AlreadyActive(_))
            ));
            assert_eq!(observe(&kv, &layout).await.unwrap().modify_index, index);
            assert!(matches!(
                flip(&kv, &layout, "dg-0000000000000000").await,
                Err(FlipError::NotPublished { dg, .. }) if dg == "dg-0000000000000000"
            ));
        });
    }

    #[test]
    fn a_corrupt_pointer_is_an_error_naming_its_key() {
        let (kv, layout) = published(&["dg-aaaaaaaaaaaaaaaa"]);
        kv.put(&layout.active(), b"not json");
        let err = block_on(observe(&kv, &layout)).unwrap_err();
        assert!(matches!(err, FlipError::Corrupt(_)));
        assert!(err.to_string().contains("simq/active"), "{err}");
    }

    #[test]
    fn rfc3339_has_the_right_shape() {
        let s = super::now_rfc3339();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && &s[10..11] == "T");
    }
}
