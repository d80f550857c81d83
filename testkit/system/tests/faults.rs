//! The fault suite: each fault of RELIABILITY.md injected into the real stack (Consul,
//! Nomad, the model, LMDB shards; two embedders, two balancers, two replicas of every
//! shard) under open-loop load of unique queries (no answer-cache hits) at half the
//! capacity measured at the start, half of them from clients that resend at once after a
//! 503. Per fault it records queries answered, failed and
//! degraded, p99 latency and the time until the stack is whole again, and checks what
//! simq promises for that fault. Then a soak: load for SIMQ_SOAK_SECS (60 s here, 600 s
//! for the full one) with a rollout in the middle, every service's memory sampled.
//!
//! With SIMQ_RELIABILITY_MD=FILE the results replace the generated part of FILE
//! (scripts/faults.sh does this for RELIABILITY.md). Needs the cluster: scripts/test.sh.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    agent_pid, bin_dir, build_and_publish, capacity, corpus_slice, deploy_with, eventually,
    indexer, passing, pids_of, quantile_ms, repo_root, shard_pids, signal, start_load, stop_jobs,
    unique_questions, unique_texts, unix_now, Frozen, LoadReport, Pace, RESENDS,
};
use simq_consul::ConsulClient;
use simq_contract::KvLayout;

const SHARDS: usize = 4;
const REPLICAS: usize = 2;
/// Share of the measured capacity the load offers.
const SHARE: f64 = 0.5;
/// The load is capped at this rate, which bounds the number of queries of the suite.
const MAX_RATE: f64 = 80.0;
/// Load before each fault and after the stack is whole again.
const CALM: Duration = Duration::from_secs(5);

/// Unique query texts: corpus questions the test dgs do not hold, each used once; after
/// the sample runs out, the same questions with a round number appended.
struct Questions {
    lines: Vec<String>,
    next: usize,
}

impl Questions {
    fn take(&mut self, n: usize) -> Vec<String> {
        unique_texts(&self.lines, self.next, n)
    }
}

/// Open-loop load of unique questions, running until `finish`.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<LoadReport>,
    started: Instant,
}

impl Load {
    fn start(questions: &mut Questions, rate: f64) -> Self {
        // Enough texts for the longest step (start_load stops at 300 s whatever happens).
        let texts = questions.take((rate * 300.0) as usize);
        let stop = Arc::new(AtomicBool::new(false));
        let task = start_load(texts.clone(), texts.len(), Pace::Rate(rate), stop.clone());
        Self {
            stop,
            task,
            started: Instant::now(),
        }
    }

    async fn finish(self, questions: &mut Questions) -> (LoadReport, f64) {
        self.stop.store(true, Ordering::Relaxed);
        let report = self.task.await.unwrap();
        questions.next += report.sent();
        (report, self.started.elapsed().as_secs_f64())
    }
}

/// One measured fault.
#[derive(Debug, serde::Serialize)]
struct Row {
    fault: String,
    rate: f64,
    seconds: f64,
    answered: usize,
    failed: usize,
    degraded: usize,
    /// Sends repeated at once by impatient clients after a 503 or a broken connection.
    resent: usize,
    p99_ms: f64,
    failed_p99_ms: f64,
    /// Seconds from the fault until the stack was whole again.
    recovery_s: Option<f64>,
    note: String,
}

impl Row {
    fn new(
        fault: &str,
        rate: f64,
        run: (LoadReport, f64),
        recovery: Option<Duration>,
        note: String,
    ) -> Self {
        let (r, seconds) = run;
        let row = Row {
            fault: fault.into(),
            rate,
            seconds: seconds.round(),
            answered: r.ok,
            failed: r.failed.len(),
            degraded: r.degraded,
            resent: r.resent,
            p99_ms: quantile_ms(&r.answered_ms, 0.99),
            failed_p99_ms: quantile_ms(&r.failed_ms, 0.99),
            recovery_s: recovery.map(|r| (r.as_secs_f64() * 10.0).round() / 10.0),
            note,
        };
        eprintln!(
            "fault suite: {row:?}; failures: {:?}",
            r.failed.iter().take(3).collect::<Vec<_>>()
        );
        row
    }

    fn markdown(&self) -> String {
        format!(
            "| {} | {} q/s for {} s | {} | {} | {} | {} | {:.0} ms | {} | {} |",
            self.fault,
            self.rate,
            self.seconds,
            self.answered,
            self.failed,
            self.degraded,
            self.resent,
            self.p99_ms,
            self.recovery_s.map_or("-".into(), |r| format!("{r:.1} s")),
            self.note
        )
    }
}

/// Healthy instances of every simq service are back to `whole` (embedders, balancers,
/// shard replicas).
async fn whole_again(whole: (usize, usize, usize)) -> Result<(), String> {
    let now = (
        passing("simq-embedder").await,
        passing("simq-balancer").await,
        passing("simq-shard").await,
    );
    if now == whole {
        Ok(())
    } else {
        Err(format!(
            "passing (embedders, balancers, shards) {now:?}, want {whole:?}"
        ))
    }
}

/// The `killed` processes are replaced: `pids` lists two again, none of them killed, and
/// every service passes again.
async fn replaced(
    pids: &dyn Fn() -> Vec<u32>,
    killed: &[u32],
    whole: (usize, usize, usize),
) -> Result<(), String> {
    let now = pids();
    if now.len() < 2 || now.iter().any(|p| killed.contains(p)) {
        return Err(format!("running {now:?}"));
    }
    whole_again(whole).await
}

fn embedder_pids() -> Vec<u32> {
    pids_of("simq-embedder", |arg| arg("--grpc-listen").is_some())
}

fn balancer_pids() -> Vec<u32> {
    pids_of("simq-balancer", |_| true)
}

/// Run `simq-indexer ARGS` until a line of its output contains `marker`, then kill it
/// with SIGKILL; returns what it printed. Panics if it ends before the marker.
fn kill_rollout_at(args: &[&str], marker: &str) -> Vec<String> {
    let mut child = Command::new(bin_dir().join("simq-indexer"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let hit = line.contains(marker);
        said.push(line);
        if hit {
            signal("-KILL", child.id());
            let _ = child.wait();
            return said;
        }
    }
    let _ = child.wait();
    panic!("simq-indexer {args:?} ended before printing {marker:?}: {said:#?}");
}

/// `simq-indexer ARGS` again until it succeeds; a lock left by a killed run is waited
/// for (it frees itself within its TTL). Returns the attempts it took.
fn run_until_done(args: &[&str]) -> usize {
    for attempt in 1..=20 {
        let out = indexer(args);
        if out.status.success() {
            return attempt;
        }
        let said = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            said.contains("another rollout is running"),
            "simq-indexer {args:?} failed: {said}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    panic!("simq-indexer {args:?} did not get the rollout lock in 20 attempts");
}

/// Resident memory of every running process of `binary`, in MiB: (sum, max).
fn rss_mib(binary: &str) -> (f64, f64) {
    let per: Vec<f64> = pids_of(binary, |_| true)
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let kb: f64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kb / 1024.0)
        })
        .collect();
    (per.iter().sum(), per.iter().copied().fold(0.0, f64::max))
}

async fn active(consul: &ConsulClient) -> String {
    simq_indexer::flip::observe(consul, &KvLayout::default())
        .await
        .unwrap()
        .active
        .map(|a| a.dg)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
async fn every_fault_of_reliability_md_measured_under_unique_query_load() {
    let tmp = tempfile::tempdir().unwrap();
    let consul = ConsulClient::from_env().unwrap();
    let (corpus_a, _) = corpus_slice(tmp.path(), "a.txt", 0..600);
    let (corpus_b, _) = corpus_slice(tmp.path(), "b.txt", 600..1200);
    let dg_a = tokio::task::spawn_blocking(move || {
        deploy_with(&corpus_a, SHARDS, REPLICAS, 8, &[("SIMQ_BALANCERS", "2")])
    })
    .await
    .unwrap();
    let dir = tmp.path().join("dgs");
    let (dg_b, _) = tokio::task::spawn_blocking(move || build_and_publish(&corpus_b, &dir, SHARDS))
        .await
        .unwrap();
    let whole = (2, 2, SHARDS * REPLICAS);
    eventually(Duration::from_secs(60), "the stack is whole", async || {
        whole_again(whole).await
    })
    .await;

    let mut questions = Questions {
        lines: unique_questions(2000, 18000),
        next: 0,
    };
    let probe = questions.take(4000);
    let measured = capacity(&probe, 8, 5.0).await;
    questions.next += 4000;
    let rate = (measured * SHARE).min(MAX_RATE).round().max(2.0);
    eprintln!("fault suite: capacity {measured:.1} unique queries/s, load {rate} q/s");
    let mut rows = Vec::new();

    // 1-3. One of two instances killed outright: the other serves while Nomad restarts it.
    let replica_dg = dg_a.clone();
    // (fault, the pids of the instances of that part)
    type Kill<'a> = (&'a str, Box<dyn Fn() -> Vec<u32>>);
    let kills: [Kill; 3] = [
        ("kill -9 one of two embedders", Box::new(embedder_pids)),
        ("kill -9 one of two balancers", Box::new(balancer_pids)),
        (
            "kill -9 one of two replicas of a shard",
            Box::new(move || shard_pids(&replica_dg, 0)),
        ),
    ];
    for (fault, pids) in kills {
        let load = Load::start(&mut questions, rate);
        tokio::time::sleep(CALM).await;
        let before = pids();
        assert_eq!(before.len(), 2, "{fault}: two instances {before:?}");
        signal("-KILL", before[0]);
        let t = Instant::now();
        eventually(Duration::from_secs(120), fault, async || {
            replaced(&pids, &before[..1], whole).await
        })
        .await;
        let recovery = t.elapsed();
        tokio::time::sleep(CALM).await;
        let row = Row::new(
            fault,
            rate,
            load.finish(&mut questions).await,
            Some(recovery),
            "Nomad restarts it".into(),
        );
        rows.push(row);
    }

    // 4. Every embedder killed: the light contour (BM25 in the shards) answers, marked
    // degraded, while none runs; the model answers again within seconds of their return,
    // without anyone's help.
    let load = Load::start(&mut questions, rate);
    tokio::time::sleep(CALM).await;
    let killed = embedder_pids();
    for &pid in &killed {
        signal("-KILL", pid);
    }
    let t = Instant::now();
    eventually(Duration::from_secs(120), "embedders back", async || {
        replaced(&embedder_pids, &killed, whole).await
    })
    .await;
    let recovery = t.elapsed();
    let back_unix = unix_now();
    tokio::time::sleep(CALM).await;
    let run = load.finish(&mut questions).await;
    let lexical = run
        .0
        .degraded_notes
        .iter()
        .filter(|n| n.contains("\"lexical\""))
        .count();
    let last_degraded = run.0.degraded_unix.iter().copied().fold(0.0, f64::max);
    let model_again = last_degraded - back_unix;
    assert!(
        run.0.degraded > 0 && lexical == run.0.degraded,
        "the light contour answered while no embedder ran: {:#?}",
        run.0.degraded_notes
    );
    assert!(
        model_again < 5.0,
        "a degraded answer {model_again:.1} s after the embedders passed again"
    );
    rows.push(Row::new(
        "kill -9 both embedders",
        rate,
        run,
        Some(recovery),
        format!(
            "{lexical} answered by the light contour (degraded), the last {} the embedders \
             passed in Consul again; no restart by hand",
            if model_again > 0.0 {
                format!("{model_again:.1} s after")
            } else {
                format!("{:.1} s before", -model_again)
            }
        ),
    ));

    // 5. A replica frozen with SIGSTOP: its sockets accept and never answer. Consul's check
    // marks it critical and the balancer stops waiting on it.
    let load = Load::start(&mut questions, rate);
    tokio::time::sleep(CALM).await;
    let victim = shard_pids(&dg_a, 1)[0];
    let frozen = Frozen::freeze(victim);
    let t = Instant::now();
    eventually(
        Duration::from_secs(60),
        "the frozen replica marked critical",
        async || match passing("simq-shard").await {
            n if n < whole.2 => Ok(()),
            n => Err(format!("{n} shard replicas pass")),
        },
    )
    .await;
    let critical = t.elapsed();
    tokio::time::sleep(Duration::from_secs(20)).await;
    drop(frozen);
    let thawed = Instant::now();
    eventually(
        Duration::from_secs(60),
        "the thawed replica passes",
        async || whole_again(whole).await,
    )
    .await;
    let back = thawed.elapsed();
    let recovery = t.elapsed();
    tokio::time::sleep(CALM).await;
    rows.push(Row::new(
        "SIGSTOP one replica for 20 s after Consul marks it critical",
        rate,
        load.finish(&mut questions).await,
        Some(recovery),
        format!(
            "critical in Consul after {:.1} s; passing {:.1} s after SIGCONT",
            critical.as_secs_f64(),
            back.as_secs_f64()
        ),
    ));

    // 6. Consul stopped for 10 s and started again on its state.
    let load = Load::start(&mut questions, rate);
    tokio::time::sleep(CALM).await;
    let before = agent_pid("consul/consul.pid");
    let t = Instant::now();
    let restart = tokio::task::spawn_blocking(|| {
        Command::new("bash")
            .arg(repo_root().join("scripts/cluster.sh"))
            .args(["restart-consul", "10"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        restart.status.success(),
        "{}",
        String::from_utf8_lossy(&restart.stderr)
    );
    assert_ne!(agent_pid("consul/consul.pid"), before);
    eventually(
        Duration::from_secs(120),
        "every service passes again",
        async || whole_again(whole).await,
    )
    .await;
    let recovery = t.elapsed();
    tokio::time::sleep(CALM).await;
    rows.push(Row::new(
        "Consul stopped for 10 s, started again",
        rate,
        load.finish(&mut questions).await,
        Some(recovery),
        "balancers serve from their last known state".into(),
    ));
    assert_eq!(
        active(&consul).await,
        dg_a,
        "the pointer survives the restart"
    );

    // 7. The rollout CLI killed with SIGKILL at each step, then run again: it converges.
    let steps = [
        ("holds the lock", "rolling out"),
        ("waits for its canaries", "deployment "),
        ("has flipped, not promoted", "active dg flipped"),
        ("has promoted", "deployment promoted"),
    ];
    let mut target = dg_b.clone();
    for (step, marker) in steps {
        let load = Load::start(&mut questions, rate);
        tokio::time::sleep(CALM).await;
        let args = ["rollout", target.as_str()].map(String::from);
        let t = Instant::now();
        let attempts = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            kill_rollout_at(&args, marker);
            run_until_done(&args)
        })
        .await
        .unwrap();
        let recovery = t.elapsed();
        assert_eq!(
            active(&consul).await,
            target,
            "rollout killed when it {step}"
        );
        assert_eq!(attempts, 1, "the killed run's lock was taken over at once");
        eventually(
            Duration::from_secs(120),
            "the old shards gone",
            async || whole_again(whole).await,
        )
        .await;
        tokio::time::sleep(CALM).await;
        let run = load.finish(&mut questions).await;
        let mixed = run.0.dgs.iter().any(|d| *d != dg_a && *d != dg_b);
        assert!(!mixed, "answers from a dg that is neither A nor B");
        rows.push(Row::new(
            &format!("rollout CLI killed (SIGKILL) when it {step}, run again"),
            rate,
            run,
            Some(recovery),
            format!("the command run again finished (attempts: {attempts})"),
        ));
        target = if target == dg_b {
            dg_a.clone()
        } else {
            dg_b.clone()
        };
    }

    for row in &rows {
        // A killed balancer's open connections break: a polite client's query on one fails.
        let lossy = row.fault.contains("balancers");
        if !lossy {
            assert_eq!(row.failed, 0, "failed queries: {row:?}");
        }
    }

    // 8. Soak: load throughout, a rollout in the middle, memory every 10 s.
    let soak = std::env::var("SIMQ_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(60);
    let mut memory = Vec::new();
    let mut reports = Vec::new();
    let started = Instant::now();
    let mut rollout: Option<tokio::task::JoinHandle<usize>> = None;
    let mut load = Load::start(&mut questions, rate);
    while started.elapsed() < Duration::from_secs(soak) {
        let at = started.elapsed().as_secs();
        memory.push((
            at,
            rss_mib("simq-balancer"),
            rss_mib("simq-embedder"),
            rss_mib("simq-shard"),
        ));
        if rollout.is_none() && at >= soak / 2 {
            let target = target.clone();
            rollout = Some(tokio::task::spawn_blocking(move || {
                run_until_done(&["rollout", &target])
            }));
        }
        if load.started.elapsed() >= Duration::from_secs(240) {
            // start_load stops at 300 s: a long soak is a chain of loads.
            reports.push(load.finish(&mut questions).await.0);
            load = Load::start(&mut questions, rate);
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    rollout.expect("the soak rolled out").await.unwrap();
    reports.push(load.finish(&mut questions).await.0);
    let mut all = LoadReport::default();
    for r in reports {
        all.ok += r.ok;
        all.failed.extend(r.failed);
        all.degraded += r.degraded;
        all.resent += r.resent;
        all.answered_ms.extend(r.answered_ms);
        all.failed_ms.extend(r.failed_ms);
    }
    assert_eq!(
        active(&consul).await,
        target,
        "the soak's rollout ended flipped"
    );
    let first = memory.first().unwrap();
    let last = memory.last().unwrap();
    let row = Row::new(
        &format!("soak: {soak} s with a rollout in the middle"),
        rate,
        (all, started.elapsed().as_secs_f64()),
        None,
        format!(
            "RSS MiB first -> last sample: balancers {:.0} -> {:.0}, embedders {:.0} -> {:.0}, shards {:.0} -> {:.0}",
            first.1 .0, last.1 .0, first.2 .0, last.2 .0, first.3 .0, last.3 .0
        ),
    );
    assert_eq!(row.failed, 0, "failed queries in the soak: {row:?}");
    rows.push(row);

    let table = [
        format!(
            "Measured {} on this machine ({} cores): capacity {measured:.1} unique queries/s \
             (8 connections, 5 s), load {rate} q/s open loop ({SHARE} of it, at most \
             {MAX_RATE}), every other query from a client that sends it again at once after \
             a 503 or a broken connection (up to {RESENDS} times), the others from clients \
             for which a 503 is a failure; {SHARDS} shards x {REPLICAS} replicas, 2 \
             embedders, 2 balancers, 600-question dgs.\n",
            date(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        "| fault | load | answered | failed | degraded | sent again at once | p99 | recovery | note |".into(),
        "|---|---|---|---|---|---|---|---|---|".into(),
    ]
    .into_iter()
    .chain(rows.iter().map(Row::markdown))
    .chain([
        String::new(),
        "Memory during the soak (resident MiB, all instances of each service):\n".into(),
        "| s | balancers | embedders | shard replicas |".into(),
        "|---|---|---|---|".into(),
    ])
    // At most about 12 rows: every n-th sample, and the last.
    .chain(memory.iter().enumerate().filter_map(|(i, (at, b, e, s))| {
        let every = memory.len().div_ceil(12);
        (i % every == 0 || i + 1 == memory.len())
            .then(|| format!("| {at} | {:.0} | {:.0} | {:.0} |", b.0, e.0, s.0))
    }))
    .collect::<Vec<_>>()
    .join("\n");
    eprintln!("{table}");
    if let Ok(path) = std::env::var("SIMQ_RELIABILITY_MD") {
        write_generated(std::path::Path::new(&path), &table);
    }
    tokio::task::spawn_blocking(stop_jobs).await.unwrap();
}

fn date() -> String {
    let out = Command::new("date").arg("+%Y-%m-%d").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Replace what lies between the generated-part markers of `path` with `table`.
fn write_generated(path: &std::path::Path, table: &str) {
    const BEGIN: &str = "<!-- faults: generated by testkit/system/tests/faults.rs -->";
    const END: &str = "<!-- faults: end -->";
    let text = std::fs::read_to_string(path).unwrap();
    let (head, rest) = text.split_once(BEGIN).expect("the begin marker");
    let (_, tail) = rest.split_once(END).expect("the end marker");
    std::fs::write(path, format!("{head}{BEGIN}\n{table}\n{END}{tail}")).unwrap();
}
