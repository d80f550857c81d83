//! Shared by the cluster tests: deploy with scripts/deploy.sh, run the indexer CLI, query
//! the balancer, and bounded query load.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const PORT: u16 = 18080;

pub fn repo_root() -> PathBuf {
    // Read at run time (cargo test sets it): a binary reused from another checkout
    // through a shared target dir must not run that checkout's scripts.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into())
        .ancestors()
        .nth(2)
        .expect("testkit/system/ sits two levels below the repository root")
        .to_path_buf()
}

/// target/<profile>/ holding all workspace binaries (cargo builds them for tests).
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Lines `range` of the real corpus sample, written to `dir/name`.
pub fn corpus_slice(
    dir: &Path,
    name: &str,
    range: std::ops::Range<usize>,
) -> (PathBuf, Vec<String>) {
    let source =
        std::env::var("SIMQ_TEST_CORPUS").expect("SIMQ_TEST_CORPUS (scripts/test.sh sets it)");
    let lines: Vec<String> = std::fs::read_to_string(&source)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let slice = lines[range].to_vec();
    let path = dir.join(name);
    std::fs::write(&path, slice.join("\n") + "\n").unwrap();
    (path, slice)
}

/// $SIMQ_CACHE, with scripts/lib.sh's default.
pub fn cache_dir() -> PathBuf {
    std::env::var("SIMQ_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/simq"))
}

/// Where scripts/cluster.sh keeps the agents' state, logs and pid files.
pub fn cluster_dir() -> PathBuf {
    std::env::var("SIMQ_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("cluster"))
}

/// Deploy the whole stack serving `corpus` with scripts/deploy.sh; returns the dg.
pub fn deploy(corpus: &Path, shards: usize, replicas: usize, nprobe: usize) -> String {
    deploy_with(corpus, shards, replicas, nprobe, &[])
}

/// `deploy` with more scripts/deploy.sh settings, e.g. ("SIMQ_CONSUL_WAIT", "2") or
/// ("SIMQ_BALANCERS", "2").
pub fn deploy_with(
    corpus: &Path,
    shards: usize,
    replicas: usize,
    nprobe: usize,
    settings: &[(&str, &str)],
) -> String {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/deploy.sh"))
        // One balancer unless a test asks for more: most tests read one instance's
        // counters and status (with several, the kernel picks which one answers).
        .env("SIMQ_BALANCERS", "1")
        .envs(settings.iter().copied())
        .env("SIMQ_BIN_DIR", bin_dir())
        .env("SIMQ_CORPUS", corpus)
        .env("SIMQ_SHARDS", shards.to_string())
        .env("SIMQ_REPLICAS", replicas.to_string())
        .env("SIMQ_NPROBE", nprobe.to_string())
        .env("SIMQ_PORT", PORT.to_string())
        .output()
        .unwrap();
    if !out.status.success() {
        stop_jobs();
        panic!("deploy failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let dg = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(dg.starts_with("dg-"), "deploy prints the dg: {dg:?}");
    dg
}

/// Run simq-indexer with the test environment.
pub fn indexer(args: &[&str]) -> Output {
    Command::new(bin_dir().join("simq-indexer"))
        .args(args)
        .output()
        .expect("indexer runs")
}

/// Build and publish a dg from `corpus`; returns (dg, dg dir).
pub fn build_and_publish(corpus: &Path, out: &Path, shards: usize) -> (String, PathBuf) {
    build_and_publish_with(corpus, out, shards, &[])
}

/// `build_and_publish` with more `simq-indexer build` flags (e.g. "--seed", "7").
pub fn build_and_publish_with(
    corpus: &Path,
    out: &Path,
    shards: usize,
    extra: &[&str],
) -> (String, PathBuf) {
    let shards = shards.to_string();
    let mut args = vec![
        "build",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--shards",
        &shards,
    ];
    args.extend_from_slice(extra);
    let b = indexer(&args);
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let dir = PathBuf::from(String::from_utf8_lossy(&b.stdout).trim());
    let blobs = cache_dir().join("blobs");
    let p = indexer(&[
        "publish",
        dir.to_str().unwrap(),
        "--blobs",
        blobs.to_str().unwrap(),
    ]);
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    (String::from_utf8_lossy(&p.stdout).trim().to_string(), dir)
}

/// The stack serving dg A (corpus sample lines 0..600: 4 shards, 1 replica, nprobe 8),
/// and dg B (lines 600..1200, 4 shards) built and published beside it; (A, B).
pub async fn serving_a_with_b_published(dir: &Path) -> (String, String) {
    let (corpus_a, _) = corpus_slice(dir, "a.txt", 0..600);
    let (corpus_b, _) = corpus_slice(dir, "b.txt", 600..1200);
    let dg_a = tokio::task::spawn_blocking(move || deploy(&corpus_a, 4, 1, 8))
        .await
        .unwrap();
    let (dg_b, _) = build_and_publish(&corpus_b, &dir.join("dgs"), 4);
    (dg_a, dg_b)
}

pub async fn post(path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{PORT}{path}"))
        .body(body)
        .send()
        .await
        .expect("balancer answers");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

pub async fn status() -> Value {
    reqwest::get(format!("http://127.0.0.1:{PORT}/v1/status"))
        .await
        .expect("balancer answers")
        .json()
        .await
        .expect("status is JSON")
}

/// The value of an unlabelled metric on the balancer's /metrics, if it is there.
pub async fn metric(name: &str) -> Option<f64> {
    let text = simq_testkit::get_text(&format!("http://127.0.0.1:{PORT}/metrics")).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

pub async fn query(text: &str) -> Value {
    let (status, body) = post("/v1/query", json!({"query": text, "k": 3}).to_string()).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Kills the child when dropped, also when an assertion fails.
pub use simq_testkit::KillOnDrop as Running;

/// scripts/setup.sh's Prometheus build (test.sh names it in SIMQ_PROMETHEUS_DIR).
pub fn prometheus_dir() -> PathBuf {
    std::env::var("SIMQ_PROMETHEUS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache_dir().join("bin/prometheus-3.16.0"))
}

/// Prometheus with the repo's consul/prometheus/prometheus.yml (it finds every simq
/// instance through Consul), listening on `listen`, its data and log in `dir`.
pub fn start_prometheus(dir: &Path, listen: &str) -> Running {
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    Running(
        Command::new(prometheus_dir().join("prometheus"))
            .arg(format!(
                "--config.file={}",
                repo_root()
                    .join("consul/prometheus/prometheus.yml")
                    .display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts (scripts/setup.sh prometheus builds it)"),
    )
}

/// Poll `check` every 500 ms until it returns Ok, or fail after `limit` with `what` and
/// the last error.
pub async fn eventually<T>(
    limit: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if Instant::now() > deadline => panic!("{what} within {limit:?}: {last}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The Consul agent's HTTP address (CONSUL_HTTP_ADDR, as the binaries read it).
pub fn consul_addr() -> String {
    std::env::var("CONSUL_HTTP_ADDR").unwrap_or("http://127.0.0.1:8500".into())
}

/// The Nomad agent's HTTP address (NOMAD_ADDR).
pub fn nomad_addr() -> String {
    std::env::var("NOMAD_ADDR").unwrap_or("http://127.0.0.1:4646".into())
}

/// Stop every simq job, wait until their tasks really ended, purge them
/// (`NomadClient::stop_jobs`, as `simq-indexer stop-jobs` does). Blocking: from async
/// tests, call it through `spawn_blocking`.
pub fn stop_jobs() {
    let nomad = simq_nomad::NomadClient::new(&nomad_addr()).expect("a Nomad address");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    if let Err(e) = rt.block_on(nomad.stop_jobs("simq-", Duration::from_secs(60))) {
        eprintln!("stopping simq's jobs: {e}");
    }
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: usize,
    /// (status, body) of every failed query.
    pub failed: Vec<(u16, String)>,
    /// dg of each successful answer, in order.
    pub dgs: Vec<String>,
    /// Successful answers marked degraded (a routed shard had no healthy replica, or the
    /// light contour answered).
    pub degraded: usize,
    /// Unix time (s) at which each degraded answer came back.
    pub degraded_unix: Vec<f64>,
    /// Sends that repeated a query at once after a 503 or a broken connection (the
    /// impatient clients of an open-loop load: `RESENDS`).
    pub resent: usize,
    /// What each degraded answer said, with the Unix time at which it came back (to set
    /// against timestamped logs): a failure then names its cause and its moment.
    pub degraded_notes: Vec<String>,
    /// Milliseconds from the scheduled send to the answer, of each successful query.
    pub answered_ms: Vec<f64>,
    /// Score of the first result of each successful answer (0 when it had none).
    pub top_scores: Vec<f64>,
    /// Milliseconds until the refusal or error, of each failed query.
    pub failed_ms: Vec<f64>,
    /// The load ended by itself (its texts or `max` used up) before it was stopped: the
    /// phase it was to cover did not run under load to its end.
    pub exhausted: bool,
}

impl LoadReport {
    /// Print what the run saw under `what` and assert that the load lasted until it was
    /// stopped, that no query failed and that none was degraded.
    pub fn assert_clean(&self, what: &str) {
        assert!(
            !self.exhausted,
            "the load ran out of texts after {} queries, before {what} ended: give it more",
            self.sent()
        );
        eprintln!(
            "{what}: {} answered, {} failed, {} degraded, {} sent again at once (after a 503 or a broken connection)",
            self.ok,
            self.failed.len(),
            self.degraded,
            self.resent
        );
        assert!(
            self.failed.is_empty(),
            "failed queries during {what}: {:?}",
            self.failed
        );
        assert_eq!(
            self.degraded, 0,
            "degraded answers during {what}: {:#?}",
            self.degraded_notes
        );
    }

    /// Queries sent (answered or failed).
    pub fn sent(&self) -> usize {
        self.ok + self.failed.len()
    }
}

/// The `p` quantile (0..=1) of `values` in milliseconds, rounded to 0.1; 0 when empty.
pub fn quantile_ms(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    simq_testkit::quantile(&v, p).map_or(0.0, |ms| (ms * 10.0).round() / 10.0)
}

/// How a load run offers its queries.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// One query at a time with a 20 ms pause, cycling through the texts.
    Serial,
    /// Open loop: this many queries per second, each text once (no answer cache hits;
    /// a refused text may go again once every text was sent); the run ends when the
    /// texts do. Every other query comes from an impatient client (sends again at once
    /// after a 503, up to `RESENDS` times), the others from polite ones (a 503 is a
    /// failure).
    Rate(f64),
}

/// Now, in seconds since the Unix epoch (to set answers against timestamped logs).
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// How often an impatient client sends a query again at once (no pause, no look at
/// Retry-After) after a 503 or a broken connection, as `wrk` and most worker pools do.
pub const RESENDS: u32 = 10;

/// The one load generator (`simq_testkit::load`) aimed at the local balancer, asking 3
/// neighbours per query and keeping every answer.
fn load_config() -> simq_testkit::load::Config {
    simq_testkit::load::Config {
        urls: vec![format!("http://127.0.0.1:{PORT}/v1/query")
            .parse()
            .expect("a URL")],
        k: 3,
        keep_answers: true,
        ..Default::default()
    }
}

impl LoadReport {
    /// The report of a run of the load generator.
    fn of(out: simq_testkit::load::Outcome) -> Self {
        let mut r = LoadReport {
            resent: out.resent_at_once,
            exhausted: out.ended == simq_testkit::load::Ended::RanOut,
            ..Default::default()
        };
        for a in out.answers {
            if !a.ok() {
                r.failed_ms.push(a.ms);
                r.failed
                    .push((a.status.parse().unwrap_or(0), a.note.unwrap_or(a.status)));
                continue;
            }
            r.ok += 1;
            r.answered_ms.push(a.ms);
            r.top_scores.push(a.top_score.unwrap_or(0.0));
            r.dgs.push(a.dg.clone().unwrap_or_default());
            if a.degraded {
                let unix = (a.due_unix_ms + a.ms) / 1000.0;
                r.degraded += 1;
                r.degraded_unix.push(unix);
                r.degraded_notes.push(format!(
                    "answered at unix {unix:.3}: {:?} {}",
                    a.dg.unwrap_or_default(),
                    a.note.unwrap_or_default()
                ));
            }
        }
        r
    }
}

/// Bounded query load (at most `max` queries, at most 300 s) until `stop` is set.
pub fn start_load(
    texts: Vec<String>,
    max: usize,
    pace: Pace,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<LoadReport> {
    let config = simq_testkit::load::Config {
        max,
        seconds: 300.0,
        ..load_config()
    };
    let config = match pace {
        Pace::Serial => simq_testkit::load::Config {
            connections: 1,
            pause: Duration::from_millis(20),
            repeat: Some(texts.len()),
            ..config
        },
        Pace::Rate(rate) => simq_testkit::load::Config {
            rate: Some(rate),
            impatient: RESENDS,
            ..config
        },
    };
    tokio::spawn(async move { LoadReport::of(simq_testkit::load::run(config, texts, stop).await) })
}

/// `n` unique query texts: corpus sample lines from `start` on (lines the tests do not
/// index), each used once; past the sample's end, the same lines again with a round
/// number appended ("... 1", "... 2"), so a load never runs short of unseen queries.
pub fn unique_questions(start: usize, n: usize) -> Vec<String> {
    let source =
        std::env::var("SIMQ_TEST_CORPUS").expect("SIMQ_TEST_CORPUS (scripts/test.sh sets it)");
    let lines: Vec<String> = std::fs::read_to_string(&source)
        .unwrap()
        .lines()
        .skip(start)
        .map(String::from)
        .collect();
    unique_texts(&lines, 0, n)
}

/// Texts `from..from + n` of the endless sequence `lines`, then `lines` with " 1"
/// appended, then with " 2", ...: unique as long as `lines` are.
pub fn unique_texts(lines: &[String], from: usize, n: usize) -> Vec<String> {
    assert!(!lines.is_empty(), "no lines to make texts of");
    (from..from + n)
        .map(|i| match i / lines.len() {
            0 => lines[i].clone(),
            round => format!("{} {round}", lines[i % lines.len()]),
        })
        .collect()
}

/// Answered queries per second with `connections` clients for `seconds`, each query
/// unique (taken from `texts`, which must hold enough); a refused query counts as not
/// answered and its client goes on at once.
pub async fn capacity(texts: &[String], connections: usize, seconds: f64) -> f64 {
    let config = simq_testkit::load::Config {
        connections,
        seconds,
        ignore_retry_after: true,
        keep_answers: false,
        ..load_config()
    };
    let out =
        simq_testkit::load::run(config, texts.to_vec(), Arc::new(AtomicBool::new(false))).await;
    out.ok() as f64 / out.seconds
}

/// Pids of the running processes of `binary` (a file name such as "simq-shard") whose
/// arguments satisfy `wanted` (called with a lookup of an option's value).
pub fn pids_of(binary: &str, wanted: impl Fn(&dyn Fn(&str) -> Option<String>) -> bool) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        let arg = |name: &str| {
            args.iter()
                .position(|a| a == name)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        if args
            .first()
            .is_some_and(|a| a.ends_with(&format!("/{binary}")))
            && wanted(&arg)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Pids of the running simq-shard processes serving `shard` of `dg`.
pub fn shard_pids(dg: &str, shard: u32) -> Vec<u32> {
    pids_of("simq-shard", |arg| {
        arg("--dg").as_deref() == Some(dg) && arg("--shard") == Some(shard.to_string())
    })
}

/// Send `signal` (e.g. "-KILL") to `pid`.
pub fn signal(signal: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {signal} {pid}");
}

/// Healthy instances of `service` in Consul's catalog.
pub async fn passing(service: &str) -> usize {
    let url = format!("{}/v1/health/service/{service}?passing=true", consul_addr());
    match reqwest::get(&url).await {
        Ok(r) => r
            .json::<Value>()
            .await
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// The pid in one of scripts/cluster.sh's pid files, e.g. "consul/consul.pid".
pub fn agent_pid(pidfile: &str) -> u32 {
    let path = cluster_dir().join(pidfile);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap()
}

/// A process frozen with SIGSTOP; thawed with SIGCONT when dropped, also when an
/// assertion fails (a frozen agent or shard would hang everything after the test).
pub struct Frozen(pub u32);

impl Frozen {
    pub fn freeze(pid: u32) -> Self {
        signal("-STOP", pid);
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}
