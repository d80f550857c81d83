//! Flipping the active dg: one check-and-set write of `<prefix>active`. Idempotent (a flip
//! to the dg already active changes nothing) and race-safe (of two concurrent flips from
//! the same state exactly one wins; the other gets [`FlipError::LostRace`]).

use simq_consul::ConsulClient;
use simq_contract::Record;
use simq_contract::{ActiveDg, KvLayout};

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

pub async fn observe(consul: &ConsulClient, layout: &KvLayout) -> Result<Observed, FlipError> {
    let key = layout.active();
    match consul.kv_get(&key, None).await?.value {
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
    consul: &ConsulClient,
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
    if consul.kv_get(&manifest_key, None).await?.value.is_none() {
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
        .kv_cas(&layout.active(), &bytes, observed.modify_index)
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
    consul: &ConsulClient,
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
    #[test]
    fn rfc3339_has_the_right_shape() {
        let s = super::now_rfc3339();
        assert_eq!(s.len(), 20, "{s}");
        assert!(s.starts_with("20") && s.ends_with('Z') && &s[10..11] == "T");
    }
}
