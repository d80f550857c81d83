//! The subcommands that talk to the cluster: publish, rollout and rollback (under the
//! rollout lock), flip, abort, compare, keys, traffic, status and the blob server. Each
//! takes its parsed arguments from `main.rs` (flags in `cli.rs`) and drives the library (`simq_indexer`). A
//! module of the `simq-indexer` binary (declared in `main.rs`), not of the library.

use std::time::Duration;

use anyhow::Context;
use simq_consul::ConsulClient;
use simq_contract::services;
use simq_contract::KvLayout;
use simq_indexer::blobs::serve;
use simq_indexer::flip::{self, Flipped};
use simq_indexer::jobs::Ran;
use simq_indexer::lock::{read_holder, RolloutLock};
use simq_indexer::models;
use simq_indexer::placement::{passing_nodes, Instance};
use simq_indexer::publish::publish as publish_dg;
use simq_indexer::rollout::{
    rollout as roll, running_dg, RolloutOptions, RolloutOutcome, SHARDS_JOB_ID,
};
use simq_nomad::NomadClient;

use crate::cli::{
    CheckCommand, ClusterArgs, CompareArgs, ConsulArgs, FlipArgs, KeysCommand, NodesOfArgs,
    PublishArgs, RolloutArgs, RolloutFlags, RunJobArgs, ServeBlobsArgs, StopJobsArgs,
    TrafficCommand,
};

/// The Consul client (with the token from the environment) and the KV layout.
fn consul_of(c: &ConsulArgs) -> anyhow::Result<(ConsulClient, KvLayout)> {
    Ok((
        ConsulClient::new(&c.consul)?.with_env_token()?,
        KvLayout::new(&c.kv_prefix),
    ))
}

pub(crate) fn clients(c: &ClusterArgs) -> anyhow::Result<(ConsulClient, NomadClient, KvLayout)> {
    let (consul, layout) = consul_of(&c.consul)?;
    let nomad = NomadClient::new(&c.nomad)?
        .with_env_token()?
        .with_env_namespace();
    Ok((consul, nomad, layout))
}

pub async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let (consul, _, layout) = clients(&args.cluster)?;
    let r = publish_dg(&args.dg_dir, &args.blobs.open()?, &consul, &layout).await?;
    if r.unchanged() {
        eprintln!(
            "dg {} already published: {} blobs present, manifest unchanged; nothing to do",
            r.dg, r.blobs_present
        );
    } else {
        eprintln!(
            "dg {} published: {} blobs added, {} repaired, {} already present; manifest {}",
            r.dg,
            r.blobs_added,
            r.blobs_repaired,
            r.blobs_present,
            if r.manifest_written {
                "written"
            } else {
                "unchanged"
            }
        );
    }
    println!("{}", r.dg);
    Ok(())
}

/// Run `work` holding the rollout lock (one rollout, rollback or flip at a time).
/// SIGINT (Ctrl-C) or SIGTERM stops the work at its next await and releases the lock;
/// running the command again (or `rollback`) converges from wherever it stopped.
pub(crate) async fn locked<T>(
    consul: &ConsulClient,
    layout: &KvLayout,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let lock = RolloutLock::acquire(consul, layout, &command).await?;
    let outcome = tokio::select! {
        r = work => r,
        _ = simq_runtime::service::shutdown_signal() => Err(anyhow::anyhow!(
            "interrupted: the rollout lock is released; run the command again (or rollback) to converge"
        )),
    };
    lock.release().await;
    outcome
}

pub async fn rollout(args: RolloutArgs, back: bool) -> anyhow::Result<()> {
    let (consul, nomad, layout) = clients(&args.flags.cluster)?;
    let dg = locked(
        &consul,
        &layout,
        rollout_locked(&consul, &nomad, &layout, args.dg, args.flags, back),
    )
    .await?;
    println!("{dg}");
    Ok(())
}

/// Embedders of `dg`'s model pass, started from `--model-dir` and `--blobs` if needed
/// (`models::ensure_for`).
async fn embedders_for(
    nomad: &NomadClient,
    consul: &ConsulClient,
    layout: &KvLayout,
    dg: &str,
    args: &RolloutFlags,
    progress: &impl Fn(&str),
) -> anyhow::Result<()> {
    let blobs = args.blobs.open_if_given()?;
    let model_dir = args.model_dir.as_deref();
    models::ensure_for_dg(
        nomad,
        consul,
        layout,
        dg,
        model_dir,
        blobs.as_ref(),
        progress,
    )
    .await
}

pub(crate) async fn rollout_locked(
    consul: &ConsulClient,
    nomad: &NomadClient,
    layout: &KvLayout,
    dg: String,
    args: RolloutFlags,
    back: bool,
) -> anyhow::Result<String> {
    let (consul, nomad, layout) = (consul.clone(), nomad.clone(), layout.clone());
    let dg = if back {
        let observed = flip::observe(&consul, &layout).await?;
        let active = observed
            .active
            .clone()
            .context("no dg is active: nothing to roll back")?;
        let previous = active
            .previous
            .context("the active dg has no previous dg to roll back to")?;
        if running_dg(&nomad).await?.as_deref() != Some(previous.as_str()) {
            eprintln!(
                "rolling back to {previous}: its shards no longer run, rolling them out again"
            );
        } else {
            let progress = |line: &str| eprintln!("{line}");
            embedders_for(&nomad, &consul, &layout, &previous, &args, &progress).await?;
            match flip::flip_from(&consul, &layout, &observed, &previous).await? {
                Flipped::Now(a) | Flipped::AlreadyActive(a) => {
                    eprintln!("active dg is {a}")
                }
            }
            models::retire_unused(&nomad, &consul, &layout, None, &progress).await?;
            return Ok(previous);
        }
        previous
    } else {
        anyhow::ensure!(!dg.is_empty(), "name the dg to roll out");
        dg
    };
    let shard_bin = match args.shard_bin.clone() {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("simq-shard"),
    };
    let replicas = match args.replicas {
        Some(r) => r,
        None => simq_indexer::rollout::running_replicas(&nomad)
            .await?
            .unwrap_or(1),
    };
    let shard_bin_sha256 = args.shard_bin_sha256.clone().unwrap_or_default();
    anyhow::ensure!(
        shard_bin_sha256.is_empty()
            || (shard_bin_sha256.len() == 64
                && shard_bin_sha256.bytes().all(|b| b.is_ascii_hexdigit())),
        "--shard-bin-sha256 {shard_bin_sha256:?} is not a sha256 (64 hex digits)"
    );
    anyhow::ensure!(
        args.driver != "exec" || !shard_bin_sha256.is_empty(),
        "--driver exec needs --shard-bin-sha256: the host path of --shard-bin is not inside the exec driver's chroot"
    );
    let replicas_apart = match args.replicas_apart {
        Some(apart) => apart,
        None => simq_indexer::rollout::running_apart(&nomad)
            .await?
            .unwrap_or(false),
    };
    let opts = RolloutOptions {
        replicas,
        blob_url: args.blob_url.clone(),
        shard_bin: shard_bin.to_string_lossy().into_owned(),
        shard_bin_sha256,
        driver: args.driver.clone(),
        replicas_apart,
        healthy_deadline: Duration::from_secs(args.healthy_deadline_secs),
        progress_deadline: Duration::from_secs(args.progress_deadline_secs),
        timeout: Duration::from_secs(args.timeout_secs),
        candidate_only: args.candidate_only && !back,
    };
    let progress = |line: &str| eprintln!("{line}");
    // A candidate already beside the active dg (`--candidate-only`) keeps its model's
    // embedders if this rollout fails before replacing it.
    let candidate_before = simq_indexer::rollout::running_dg(&nomad).await?;
    let outcome: anyhow::Result<RolloutOutcome> = async {
        // Embedders of the dg's model first (a model rollout starts them beside the old).
        embedders_for(&nomad, &consul, &layout, &dg, &args, &progress).await?;
        match &args.progressive {
            Some(weights) if !back => {
                let plan = simq_indexer::progressive::Plan {
                    weights: weights.clone(),
                    shadow: args.shadow,
                    step: Duration::from_secs(args.step_secs),
                    prometheus: args.judge.prometheus.clone(),
                    thresholds: args.judge.thresholds(),
                };
                simq_indexer::progressive::run(
                    &nomad, &consul, &layout, &dg, &opts, &plan, progress,
                )
                .await
            }
            _ => roll(&nomad, &consul, &layout, &dg, &opts, progress).await,
        }
    }
    .await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(failed) => {
            // The active dg is unchanged: embedders started above for the dg's model
            // (also ones that never came to pass) stop again; those of the active dg,
            // of a split's candidate and of a candidate still running stay.
            let running_now = simq_indexer::rollout::running_dg(&nomad)
                .await
                .ok()
                .flatten();
            let survivor =
                models::surviving_candidate(candidate_before.as_deref(), running_now.as_deref());
            if let Err(e) =
                models::retire_unused(&nomad, &consul, &layout, survivor, &progress).await
            {
                eprintln!("after the failed rollout, stopping unused embedders failed too: {e:#}");
            }
            return Err(failed);
        }
    };
    let (flipped, seconds_to_flip) = match outcome {
        RolloutOutcome::Done {
            flipped,
            seconds_to_flip,
        } => (flipped, seconds_to_flip),
        RolloutOutcome::CandidateReady { seconds } => {
            eprintln!(
                    "candidate {dg} runs beside the active dg ({seconds:.1} s); next: `simq-indexer traffic set {dg} --weight W`, then `rollout {dg}` to flip or `abort` to stop it"
                );
            return Ok(dg);
        }
    };
    models::retire_unused(&nomad, &consul, &layout, None, &progress).await?;
    match flipped {
        Flipped::Now(a) => {
            eprintln!("done: active dg is {a}, {seconds_to_flip:.1} s from rollout to flip")
        }
        Flipped::AlreadyActive(a) => eprintln!("done: {} was already active", a.dg),
    }
    Ok(dg)
}

pub async fn flip(args: FlipArgs) -> anyhow::Result<()> {
    let (consul, _, layout) = clients(&args.cluster)?;
    let flipped = locked(&consul, &layout, async {
        Ok(flip::flip(&consul, &layout, &args.dg).await?)
    })
    .await?;
    match flipped {
        Flipped::Now(a) => eprintln!("active dg is now {a}"),
        Flipped::AlreadyActive(a) => eprintln!("{} is already active; nothing changed", a.dg),
    }
    Ok(())
}

pub async fn abort(args: ClusterArgs) -> anyhow::Result<()> {
    let (consul, nomad, layout) = clients(&args)?;
    locked(&consul, &layout, async {
        let progress = |l: &str| eprintln!("{l}");
        match simq_indexer::progressive::stop_candidate(&nomad, &consul, &layout, &progress).await?
        {
            Some(dg) => eprintln!("done: candidate {dg} stopped"),
            None => eprintln!("no candidate runs beside the active dg; nothing to stop"),
        }
        // A candidate of another model had its embedders started for it.
        models::retire_unused(&nomad, &consul, &layout, None, &progress).await
    })
    .await
}

pub async fn compare(args: CompareArgs) -> anyhow::Result<()> {
    use simq_indexer::compare::{fetch, table, verdict};
    let window = Duration::from_secs(args.window_secs);
    let c = fetch(&args.judge.prometheus, window).await?;
    println!(
        "last {} s, from {}:",
        window.as_secs(),
        args.judge.prometheus
    );
    print!("{}", table(&c));
    let checks = verdict(&c, &args.judge.thresholds());
    for check in &checks {
        println!(
            "{} {:<9} {}",
            if check.passed { "pass" } else { "FAIL" },
            check.name,
            check.detail
        );
    }
    let failed = checks.iter().filter(|c| !c.passed).count();
    if failed > 0 {
        anyhow::bail!("the candidate fails {failed} of {} checks", checks.len());
    }
    println!("verdict: the candidate passes every check");
    Ok(())
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    use simq_indexer::keys;
    match cmd {
        KeysCommand::Create(a) => {
            let (consul, layout) = consul_of(&a.consul)?;
            let new = keys::NewKey {
                label: a.label,
                rate: a.rate,
                burst: a.burst,
                admin: a.admin,
            };
            let (key, r) = keys::create(&consul, &layout, &new).await?;
            eprintln!(
                "key {} created ({}, {} queries/s, burst {}{}); it is printed once, below: store it now",
                r.id,
                r.label,
                r.rate,
                r.burst,
                if r.admin { ", admin" } else { "" }
            );
            println!("{key}");
        }
        KeysCommand::List(a) => {
            let (consul, layout) = consul_of(&a.consul)?;
            let (records, bad) = keys::list(&consul, &layout).await?;
            if records.is_empty() {
                eprintln!("no API keys under {}", layout.api_keys());
            }
            for r in records {
                println!(
                    "{}  rate {}/s  burst {}  {}  created {}  {}",
                    r.id,
                    r.rate,
                    r.burst,
                    if r.admin { "admin" } else { "query" },
                    r.created_at,
                    r.label
                );
            }
            for b in bad {
                eprintln!("skipped (balancers ignore it too): {b}");
            }
        }
        KeysCommand::Revoke(a) => {
            let (consul, layout) = consul_of(&a.consul)?;
            keys::revoke(&consul, &layout, &a.id).await?;
            eprintln!("key {} revoked", a.id);
        }
    }
    Ok(())
}

pub async fn traffic(cmd: TrafficCommand) -> anyhow::Result<()> {
    use simq_indexer::traffic::{self, describe};
    match cmd {
        TrafficCommand::Set(a) => {
            let (consul, layout) = consul_of(&a.consul)?;
            let observed = traffic::observe(&consul, &layout).await?;
            let new = traffic::SetSplit {
                candidate: a.candidate,
                weight: a.weight,
                shadow: a.shadow,
                salt: a.salt,
            };
            let split = traffic::set(&consul, &layout, &observed, &new).await?;
            eprintln!("traffic split set: {}", describe(&split));
            println!("{}", serde_json::to_string(&split)?);
        }
        TrafficCommand::Show(a) => {
            let (consul, layout) = consul_of(&a.consul)?;
            match traffic::observe(&consul, &layout).await?.split {
                None => println!("no traffic split: the active dg answers every query"),
                Some(Ok(s)) => println!("{}", describe(&s)),
                Some(Err(e)) => println!("{e} (balancers send no traffic to a candidate)"),
            }
            let http = simq_indexer::rollout::status_client();
            for b in consul
                .health_service(services::BALANCER, true, None)
                .await?
                .value
            {
                let url = format!("http://{}:{}/v1/status", b.address, b.port);
                let seen = match http.get(&url).send().await {
                    Ok(r) => r.json::<serde_json::Value>().await.unwrap_or_default(),
                    Err(e) => {
                        println!("  balancer {}:{}: unreachable: {e}", b.address, b.port);
                        continue;
                    }
                };
                let t = &seen["traffic"];
                let what = if t.is_null() {
                    "no split".to_string()
                } else if t["serving"] == true {
                    format!("sends {} users to {}", t["weight"], t["candidate"])
                } else {
                    format!(
                        "no candidate traffic: {}",
                        t["not_ready"].as_str().unwrap_or("not ready")
                    )
                };
                println!("  balancer {}:{}: {what}", b.address, b.port);
            }
        }
        TrafficCommand::Clear(a) => {
            let (consul, layout) = consul_of(&a.consul)?;
            let observed = traffic::observe(&consul, &layout).await?;
            match traffic::clear(&consul, &layout, &observed).await? {
                None => eprintln!("no traffic split was set; nothing to clear"),
                Some(Ok(s)) => eprintln!("traffic split cleared (was: {})", describe(&s)),
                Some(Err(e)) => eprintln!("traffic split cleared (was unreadable: {e})"),
            }
        }
    }
    Ok(())
}

pub async fn status(args: ClusterArgs) -> anyhow::Result<()> {
    let (consul, nomad, layout) = clients(&args)?;
    let observed = flip::observe(&consul, &layout).await?;
    match &observed.active {
        Some(a) => println!(
            "active:   {} (since {})\nprevious: {}",
            a.dg,
            a.flipped_at,
            a.previous.as_deref().unwrap_or("-")
        ),
        None => println!("active:   - (no dg was ever activated)"),
    }
    let lock = read_holder(&consul, &layout).await?.map(|h| match h {
        Ok(h) => format!("held by {} since {} ({})", h.who, h.since, h.command),
        Err(_) => "held (unreadable holder)".into(),
    });
    println!("rollout lock: {}", lock.as_deref().unwrap_or("free"));
    match simq_indexer::traffic::observe(&consul, &layout)
        .await?
        .split
    {
        None => println!("traffic split: none"),
        Some(Ok(s)) => println!("traffic split: {}", simq_indexer::traffic::describe(&s)),
        Some(Err(e)) => println!("traffic split: {e}"),
    }
    println!(
        "shards job runs: {}",
        running_dg(&nomad).await?.as_deref().unwrap_or("-")
    );
    if let Some(d) = nomad.latest_deployment(SHARDS_JOB_ID).await? {
        println!(
            "latest deployment: {} version {} {} ({})",
            &d.id[..8],
            d.job_version,
            d.status,
            d.status_description
        );
    }
    // Every instance as Consul sees it; balancers also say which dg they route with.
    let http = simq_indexer::rollout::status_client();
    for service in services::ALL {
        let entries = consul.health_service(service, false, None).await?.value;
        println!("{service}: {} instance(s)", entries.len());
        for e in entries {
            let mut line = format!("  {}:{} {}", e.address, e.port, e.status);
            if !e.tags.is_empty() {
                line.push_str(&format!(" [{}]", e.tags.join(", ")));
            }
            if service == services::BALANCER {
                let routes = match simq_indexer::rollout::balancer_dg(&http, &e).await {
                    Ok(dg) => dg.unwrap_or_else(|| "no dg".into()),
                    Err(e) => format!("unreachable: {e}"),
                };
                line.push_str(&format!(", routes with {routes}"));
            }
            println!("{line}");
        }
    }
    println!("consul: {}/ui  nomad: {}/ui", consul.addr(), nomad.addr());
    Ok(())
}

pub async fn serve_blobs(args: ServeBlobsArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(dir = %args.dir.display(), listen = %args.listen, "serving blobs");
    serve(
        args.dir.clone(),
        listener,
        simq_runtime::service::shutdown_signal(),
    )
    .await;
    Ok(())
}

pub async fn run_job(args: RunJobArgs) -> anyhow::Result<()> {
    let (_, nomad, _) = clients(&args.cluster)?;
    let vars = simq_indexer::jobs::parse_vars(&args.vars)?;
    let limit = Duration::from_secs(args.timeout_secs);
    match simq_indexer::jobs::run_job(&nomad, &args.spec, &vars, limit).await? {
        Ran::Unchanged { job, version } => {
            eprintln!("{job} version {version} already runs: nothing to deploy")
        }
        Ran::Deployed { job, version } => eprintln!("{job} version {version} deployed"),
    }
    Ok(())
}

pub async fn stop_jobs(args: StopJobsArgs) -> anyhow::Result<()> {
    let (_, nomad, _) = clients(&args.cluster)?;
    let stopped = nomad
        .stop_jobs("simq-", Duration::from_secs(args.wait_secs))
        .await?;
    for id in &stopped {
        tracing::info!(job = %id, "stopped and purged");
    }
    eprintln!("{} simq jobs stopped and purged", stopped.len());
    Ok(())
}

/// `check placement|shards-full|settled`: prints what is off and fails when anything is.
pub async fn check(cmd: CheckCommand) -> anyhow::Result<()> {
    use simq_indexer::placement::observe;
    let problems = match cmd {
        CheckCommand::Placement(a) => {
            let (consul, layout) = consul_of(&a.consul)?;
            let observed = observe(&consul, None, &layout).await?;
            let dg =
                a.dg.or_else(|| observed.active.as_ref().map(|(dg, _)| dg.clone()));
            for line in observed.listing(dg.as_deref()) {
                println!("  {line}");
            }
            observed.placement_problems(a.nodes, dg.as_deref())
        }
        CheckCommand::ShardsFull(a) => {
            let (consul, nomad, layout) = clients(&a.cluster)?;
            let observed = observe(&consul, None, &layout).await?;
            let mut problems = observed.shards_full_problems(a.without.as_deref(), a.replicas);
            if !problems.is_empty() {
                problems.extend(nomad.placement_failures(SHARDS_JOB_ID).await?);
            }
            problems
        }
        CheckCommand::Settled(a) => {
            let (consul, nomad, layout) = clients(&a)?;
            observe(&consul, Some(&nomad), &layout)
                .await?
                .settled_problems()
        }
    };
    if problems.is_empty() {
        return Ok(());
    }
    for p in &problems {
        println!("  FAIL: {p}");
    }
    anyhow::bail!("{} check(s) failed (above)", problems.len())
}

pub async fn nodes_of(args: NodesOfArgs) -> anyhow::Result<()> {
    let (consul, _) = consul_of(&args.consul)?;
    anyhow::ensure!(
        services::ALL.contains(&args.service.as_str()),
        "unknown service {:?}: one of {}",
        args.service,
        services::ALL.join(", ")
    );
    let entries = consul
        .health_service(&args.service, false, None)
        .await?
        .value;
    let instances: Vec<Instance> = entries.iter().map(Instance::from_entry).collect();
    println!("{}", passing_nodes(&instances, &args.service).join(" "));
    Ok(())
}
