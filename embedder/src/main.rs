//! simq-embedder: the sentence-embedding service (see `--help`).

use clap::Parser;

/// Turns texts into L2-normalised sentence embeddings over gRPC.
///
/// Loads a model directory (model.onnx, tokenizer.json, simq-model.json) into ONNX
/// Runtime, batches concurrent requests, and reports the model id (a content hash of the
/// model files) so balancers only pair it with index generations built by the same model.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Model directory (as laid out by scripts/setup.sh).
    #[arg(long, env = "SIMQ_MODEL_DIR")]
    model_dir: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!("the embedding service is not built yet (issue 4); model dir {}", args.model_dir.display())
}
