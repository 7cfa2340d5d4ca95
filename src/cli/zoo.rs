//! `fusion zoo`: pools of checkpoints.

use std::path::PathBuf;

use clap::Subcommand;
use merger::checkpoint::parse_dtype;
use merger::zoo::{synth, LlamaShape, SynthOptions};

/// Subcommands of `fusion zoo`.
#[derive(Subcommand)]
pub enum ZooCommand {
    /// Write a random Llama-shaped pool: `base` and `expert_1..K` (base + small deltas).
    Synth {
        /// Approximate parameter count (e.g. 1B, 100M).
        #[arg(long, value_parser = super::parse_count)]
        params: u64,
        /// Number of experts.
        #[arg(long, default_value_t = 3)]
        experts: usize,
        /// Stored dtype: f32, f16 or bf16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Seed of the random values.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output folder (gets base/ and expert_k/).
        #[arg(long)]
        out: PathBuf,
        /// Replace existing checkpoint folders.
        #[arg(long)]
        force: bool,
    },
}

/// Runs `fusion zoo`.
pub fn run(cmd: ZooCommand) -> anyhow::Result<()> {
    match cmd {
        ZooCommand::Synth {
            params,
            experts,
            dtype,
            seed,
            out,
            force,
        } => {
            let dtype = parse_dtype(&dtype)
                .ok_or_else(|| anyhow::anyhow!("`--dtype {dtype}`: expected f32, f16 or bf16"))?;
            let shape = LlamaShape::for_params(params);
            eprintln!(
                "writing a {}-parameter Llama pool (hidden {}, {} layers, vocab {}) with {experts} experts to {}",
                shape.params(),
                shape.hidden,
                shape.layers,
                shape.vocab,
                out.display()
            );
            let dirs = synth(
                &out,
                &SynthOptions {
                    params,
                    experts,
                    dtype,
                    seed,
                    force,
                },
            )?;
            for d in dirs {
                println!("{}", d.display());
            }
            Ok(())
        }
    }
}
