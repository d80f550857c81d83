//! simq-indexer: builds, evaluates, publishes and rolls out index generations. Parses
//! flags (`cli.rs`) and hands each subcommand to the part that runs it: `files.rs` for
//! the ones that work on files, `cluster.rs` for the ones that talk to the cluster; both
//! drive the library (see lib.rs).

mod cli;
mod cluster;
mod files;

use clap::Parser;
use simq_indexer::eval::DgDir;

use cli::{Cli, Command};

#[allow(unsafe_code)] // one libc call, see SAFETY
fn main() {
    // Like other CLI tools, end quietly when the reader of stdout goes away (`| head`)
    // instead of panicking on a failed print.
    // SAFETY: restoring the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    simq_consul::service::init_logging();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
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
            print!("{}", simq_consul::defaults::as_lines());
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
        Command::Keys(cmd) => rt()?.block_on(cluster::keys(cmd)),
        Command::Traffic(cmd) => rt()?.block_on(cluster::traffic(cmd)),
        Command::PutBlob(args) => rt()?.block_on(async {
            let store = args.blobs.open()?;
            for file in &args.files {
                let sha = simq_consul::contract::sha256_file(file)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
                store.put(file, &sha).await?;
                println!("{sha}");
            }
            Ok(())
        }),
        Command::ServeBlobs(args) => {
            // Handing out shard files is background work: serving queries comes first.
            simq_consul::service::lower_priority(10);
            rt()?.block_on(cluster::serve_blobs(args))
        }
    }
}
