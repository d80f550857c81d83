//! `simq-indexer traffic set|show|clear`: the traffic split between the active dg and a
//! candidate (`<prefix>traffic`, see `simq_contract::traffic`). Every write is a
//! check-and-set against the value read, so two operators never overwrite each other
//! unknowingly: the second gets an error that says what the split is now.

use anyhow::{anyhow, bail, Context};
use simq_consul::ConsulClient;
use simq_contract::Record;
use simq_contract::{KvLayout, TrafficSplit};

/// The split as read, with the index a CAS write must name.
#[derive(Debug, Clone)]
pub struct Observed {
    /// The split; `Err` with the reason when the key holds something that is not one.
    pub split: Option<Result<TrafficSplit, simq_contract::Invalid>>,
    /// Modify index of the key, 0 when it does not exist.
    pub modify_index: u64,
}

pub async fn observe(consul: &ConsulClient, layout: &KvLayout) -> anyhow::Result<Observed> {
    let key = layout.traffic();
    Ok(match consul.kv_get(&key, None).await?.value {
        None => Observed {
            split: None,
            modify_index: 0,
        },
        Some(kv) => Observed {
            split: Some(TrafficSplit::decode(&key, &kv.value)),
            modify_index: kv.modify_index,
        },
    })
}

/// What `traffic set` asks for.
#[derive(Debug, Clone)]
pub struct SetSplit {
    pub candidate: String,
    pub weight: f64,
    pub shadow: f64,
    /// None: keep the current split's salt when it names the same candidate (the same
    /// experiment at another weight), else a new one.
    pub salt: Option<String>,
}

/// Write the split if it is still what `observed` saw. The candidate must be published
/// and must not be the active dg.
pub async fn set(
    consul: &ConsulClient,
    layout: &KvLayout,
    observed: &Observed,
    new: &SetSplit,
) -> anyhow::Result<TrafficSplit> {
    let manifest = layout.manifest(&new.candidate);
    if !simq_contract::kv::is_dg_name(&new.candidate) {
        bail!(
            "{:?} is not a dg id (dg- and 16 lowercase hex digits)",
            new.candidate
        );
    }
    if consul.kv_get(&manifest, None).await?.value.is_none() {
        bail!(
            "dg {} is not published: {manifest} does not exist (run `simq-indexer publish` first)",
            new.candidate
        );
    }
    let active = crate::flip::observe(consul, layout).await?.active;
    if active.as_ref().is_some_and(|a| a.dg == new.candidate) {
        bail!(
            "{} is the active dg already; a candidate is another dg",
            new.candidate
        );
    }
    let current = observed.split.clone().and_then(Result::ok);
    let salt = match (&new.salt, current) {
        (Some(salt), _) => salt.clone(),
        (None, Some(cur)) if cur.candidate == new.candidate => cur.salt,
        (None, _) => format!("exp-{}", crate::flip::now_rfc3339()),
    };
    let split = TrafficSplit {
        candidate: new.candidate.clone(),
        weight: new.weight,
        shadow: new.shadow,
        salt,
        set_at: crate::flip::now_rfc3339(),
    };
    split.validate().map_err(|e| anyhow!("{e}"))?;
    let bytes = serde_json::to_vec_pretty(&split)?;
    if !consul
        .kv_cas(&layout.traffic(), &bytes, observed.modify_index)
        .await?
    {
        bail!("{}", lost_race(consul, layout).await);
    }
    Ok(split)
}

/// Remove the split if it is still what `observed` saw (also a value that is not a
/// split): every query goes to the active dg again. `Ok(None)` when none was set.
pub async fn clear(
    consul: &ConsulClient,
    layout: &KvLayout,
    observed: &Observed,
) -> anyhow::Result<Option<Result<TrafficSplit, simq_contract::Invalid>>> {
    if observed.split.is_none() {
        return Ok(None);
    }
    let key = layout.traffic();
    if !consul
        .kv_delete_cas(&key, observed.modify_index)
        .await
        .with_context(|| format!("deleting {key}"))?
    {
        bail!("{}", lost_race(consul, layout).await);
    }
    Ok(observed.split.clone())
}

/// The error of a CAS write that lost: what the split is now.
async fn lost_race(consul: &ConsulClient, layout: &KvLayout) -> String {
    let now = match observe(consul, layout).await {
        Ok(Observed { split: None, .. }) => "no split".to_string(),
        Ok(Observed {
            split: Some(Ok(s)), ..
        }) => describe(&s),
        Ok(Observed {
            split: Some(Err(e)),
            ..
        }) => e.to_string(),
        Err(e) => format!("unknown ({e})"),
    };
    format!(
        "the traffic split changed while this command ran; nothing was written. It is now: {now}"
    )
}

/// One line for people: "dg-x gets 20 % of users (shadow 50 % of the rest), salt s, set t".
pub fn describe(s: &TrafficSplit) -> String {
    format!(
        "candidate {} gets {:.1} % of users, shadow {:.1} % of the active dg's queries, salt {}, set {}",
        s.candidate,
        s.weight * 100.0,
        s.shadow * 100.0,
        s.salt,
        s.set_at
    )
}
