//! simq-indexer: builds, evaluates, publishes and rolls out index generations. Parses
//! flags (`cli.rs`) and hands each subcommand to the part that runs it: `files.rs` for
//! the ones that work on files, `cluster.rs` for the ones that talk to the cluster; both
//! drive the library (see lib.rs).

mod cli;
mod cluster;
mod deploy;
mod files;

use clap::Parser;
use simq_indexer::eval::DgDir;

use cli::{Cli, Command};

fn main() {
    simq_runtime::service::init_logging();
    let cli = Cli::parse();
    if cli.command.works_on_files_only() {
        quiet_on_closed_stdout();
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Like other CLI tools, end quietly when the reader of stdout goes away (`| head`)
/// instead of panicking on a failed print: SIGPIPE back to its default, which ends the
/// process. Only for the subcommands that open no socket. Rust ignores SIGPIPE because a
/// socket write can raise it too: hyper writes requests with `writev`, which (unlike
/// `send` with MSG_NOSIGNAL) raises SIGPIPE when the peer is gone. With the default
/// restored, `publish` died silently (exit by signal, no message) when a blob store node
/// lost power mid-upload (the node suite, 2026-12-07).
#[allow(unsafe_code)] // one libc call, see SAFETY
fn quiet_on_closed_stdout() {
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    };
    match cli.command {
        Command::Build(args) => files::run_build(args),
        Command::Eval(args) => files::run_eval(args),
        Command::Contours(args) => files::run_contours(args),
        Command::Export(args) => {
            let n = simq_indexer::eval::export(&DgDir::open(&args.dg_dir)?, &args.out)?;
            eprintln!("{n} items written to {}", args.out.display());
            Ok(())
        }
        Command::Defaults => {
            print!("{}", simq_contract::defaults::as_lines());
            Ok(())
        }
        Command::ModelId(args) => {
            println!(
                "{}",
                simq_embedder::model::ModelDir::open(&args.model_dir)?.model_id
            );
            Ok(())
        }
        Command::Publish(args) => rt()?.block_on(cluster::publish(args)),
        Command::Rollout(args) => rt()?.block_on(cluster::rollout(args, false)),
        Command::Rollback(args) => rt()?.block_on(cluster::rollout(args, true)),
        Command::Flip(args) => rt()?.block_on(cluster::flip(args)),
        Command::Abort(args) => rt()?.block_on(cluster::abort(args)),
        Command::Compare(args) => rt()?.block_on(cluster::compare(args)),
        Command::Status(args) => rt()?.block_on(cluster::status(args)),
        Command::StopJobs(args) => rt()?.block_on(cluster::stop_jobs(args)),
        Command::RunJob(args) => rt()?.block_on(cluster::run_job(args)),
        Command::Keys(cmd) => rt()?.block_on(cluster::keys(cmd)),
        Command::Traffic(cmd) => rt()?.block_on(cluster::traffic(cmd)),
        Command::Deploy(args) => rt()?.block_on(deploy::deploy(args)),
        Command::Check(cmd) => rt()?.block_on(cluster::check(cmd)),
        Command::NodesOf(args) => rt()?.block_on(cluster::nodes_of(args)),
        Command::PutBlob(args) => rt()?.block_on(async {
            let store = args.blobs.open()?;
            for file in &args.files {
                println!("{}", deploy::put_blob(&store, file).await?);
            }
            Ok(())
        }),
        Command::ServeBlobs(args) => {
            // Handing out shard files is background work: serving queries comes first.
            simq_runtime::service::lower_priority(10);
            rt()?.block_on(cluster::serve_blobs(args))
        }
    }
}
