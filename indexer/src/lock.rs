//! One rollout at a time: `rollout`, `rollback` and `flip` hold a Consul lock
//! (`<prefix>rollout/lock`, taken with a session) for as long as they change the cluster.
//! A second command finds the lock held and says by whom, since when and doing what.
//! The holder renews its session every few seconds; a holder that dies (kill -9, a lost
//! machine) stops renewing and Consul frees the lock when the session's TTL runs out
//! (Consul allows itself up to twice the TTL). A holder that was a process on this
//! machine and is gone is not waited for: the next command ends its session and takes the
//! lock at once. Ctrl-C releases it at once (see `main.rs`).

use std::time::Duration;

use anyhow::{bail, Context};
use simq_consul::ConsulClient;
use simq_contract::KvLayout;

/// How long a lock outlives its holder's last renewal.
pub const LOCK_TTL: Duration = Duration::from_secs(15);

/// Who holds the lock, as stored in its value.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Holder {
    /// `user@host pid N`.
    pub who: String,
    /// The command line.
    pub command: String,
    /// RFC 3339 time it was taken.
    pub since: String,
}

impl Holder {
    /// Is the holder a process of this machine that no longer runs simq-indexer? (None
    /// when that cannot be told: another machine, or a value that names no pid.)
    pub fn gone_from(&self, host: &str, running: impl Fn(u32) -> bool) -> Option<bool> {
        let (_, rest) = self.who.split_once('@')?;
        let (holder_host, pid) = rest.split_once(" pid ")?;
        let pid: u32 = pid.trim().parse().ok()?;
        (holder_host == host).then(|| !running(pid))
    }

    /// This process, running `command`.
    pub fn this_process(command: &str) -> Self {
        let user = std::env::var("USER").unwrap_or_else(|_| "?".into());
        Self {
            who: format!("{user}@{} pid {}", hostname(), std::process::id()),
            command: command.to_string(),
            since: crate::flip::now_rfc3339(),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Does process `pid` of this machine run simq-indexer?
fn runs_indexer(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("simq-indexer"))
}

/// The message for a lock somebody else holds.
pub fn held_by(holder: Option<&Holder>) -> String {
    match holder {
        Some(h) => format!(
            "another rollout is running: {} has held the rollout lock since {} ({}). Wait for it to end; \
             if that process is gone, a run on its machine takes the lock over, and elsewhere the \
             lock frees itself within {}-{} s",
            h.who,
            h.since,
            h.command,
            LOCK_TTL.as_secs(),
            2 * LOCK_TTL.as_secs()
        ),
        None => "another rollout is running (the rollout lock is held)".into(),
    }
}

/// Who holds the lock now: `None` when it is free, `Some(Err)` when its value is not a
/// holder.
pub async fn read_holder(
    consul: &ConsulClient,
    layout: &KvLayout,
) -> simq_consul::Result<Option<Result<Holder, serde_json::Error>>> {
    let kv = consul.kv_get(&layout.rollout_lock(), None).await?.value;
    Ok(kv.map(|kv| serde_json::from_slice::<Holder>(&kv.value)))
}

/// The lock, held until [`RolloutLock::release`] (or until the process dies and the TTL
/// runs out).
pub struct RolloutLock {
    consul: ConsulClient,
    session: String,
    renew: tokio::task::JoinHandle<()>,
}

impl RolloutLock {
    /// Take the lock for `command`, or fail naming its holder.
    pub async fn acquire(
        consul: &ConsulClient,
        layout: &KvLayout,
        command: &str,
    ) -> anyhow::Result<Self> {
        let key = layout.rollout_lock();
        let session = consul
            .session_create("simq rollout lock", LOCK_TTL)
            .await
            .context("creating a Consul session for the rollout lock")?;
        let me = serde_json::to_vec(&Holder::this_process(command))?;
        let mut taken = consul.kv_acquire(&key, &me, &session).await;
        if matches!(taken, Ok(false)) && take_over_a_dead_holder(consul, &key).await {
            taken = consul.kv_acquire(&key, &me, &session).await;
        }
        if !matches!(taken, Ok(true)) {
            let _ = consul.session_destroy(&session).await;
            let holder = read_holder(consul, layout)
                .await
                .ok()
                .flatten()
                .and_then(Result::ok);
            taken.context("taking the rollout lock")?;
            bail!("{}", held_by(holder.as_ref()));
        }
        let renew = {
            let (consul, session) = (consul.clone(), session.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LOCK_TTL / 3).await;
                    match consul.session_renew(&session).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(
                                "the rollout lock's session expired; another rollout may start"
                            );
                            return;
                        }
                        Err(e) => tracing::warn!(error = %e, "could not renew the rollout lock"),
                    }
                }
            })
        };
        Ok(Self {
            consul: consul.clone(),
            session,
            renew,
        })
    }

    /// Give the lock back now. If this future is dropped before Consul answered, the
    /// drop releases it (see [`Drop`]).
    pub async fn release(mut self) {
        self.renew.abort();
        match self.consul.session_destroy(&self.session).await {
            Ok(()) => self.session.clear(),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the rollout lock; it frees itself when its session expires")
            }
        }
    }
}

/// End the session of a lock whose holder was a process of this machine that is gone (a
/// killed rollout), so the lock can be taken now instead of after its TTL. True when it did.
async fn take_over_a_dead_holder(consul: &ConsulClient, key: &str) -> bool {
    let Ok(Some(kv)) = consul.kv_get(key, None).await.map(|r| r.value) else {
        return false;
    };
    let (Some(session), Ok(holder)) = (&kv.session, serde_json::from_slice::<Holder>(&kv.value))
    else {
        return false;
    };
    if holder.gone_from(&hostname(), runs_indexer) != Some(true) {
        return false;
    }
    tracing::warn!(holder = %holder.who, since = %holder.since, "the rollout lock's holder is gone from this machine; taking the lock over");
    eprintln!(
        "the rollout lock was held by {} (since {}), which no longer runs: taking it over",
        holder.who, holder.since
    );
    consul.session_destroy(session).await.is_ok()
}

impl Drop for RolloutLock {
    /// Not released by [`RolloutLock::release`] (the command's future was dropped at an
    /// await, or an error path): stop renewing and end the session from a task of the
    /// runtime, so the lock frees now; if the runtime is gone too, the TTL frees it.
    fn drop(&mut self) {
        self.renew.abort();
        if self.session.is_empty() {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (consul, session) = (self.consul.clone(), std::mem::take(&mut self.session));
            runtime.spawn(async move {
                if let Err(e) = consul.session_destroy(&session).await {
                    tracing::warn!(error = %e, "could not release the dropped rollout lock; it frees itself when its session expires");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_holder_of_this_machine_that_is_gone_is_taken_over() {
        let h = |who: &str| Holder {
            who: who.into(),
            command: "simq-indexer rollout dg-1".into(),
            since: String::new(),
        };
        let running = |pid| pid == 7;
        assert_eq!(h("ann@box pid 42").gone_from("box", running), Some(true));
        assert_eq!(h("ann@box pid 7").gone_from("box", running), Some(false));
        assert_eq!(h("ann@other pid 42").gone_from("box", running), None);
        assert_eq!(h("garbage").gone_from("box", running), None);
        assert_eq!(h("ann@box pid x").gone_from("box", running), None);
    }

    #[test]
    fn the_refusal_names_the_holder_and_the_way_out() {
        let h = Holder {
            who: "ann@box pid 42".into(),
            command: "simq-indexer rollout dg-1".into(),
            since: "2026-11-24T06:00:00Z".into(),
        };
        let m = held_by(Some(&h));
        for part in [
            "ann@box pid 42",
            "2026-11-24T06:00:00Z",
            "rollout dg-1",
            "15-30 s",
        ] {
            assert!(m.contains(part), "{m}");
        }
    }
}
