//! `fusion embed`: embeddings of texts from a checkpoint folder or a merge
//! of a pool's checkpoints, for checking by hand (the same computation as
//! `POST /v1/embeddings`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{ArgGroup, Args, ValueEnum};
use evaluator::pool::ModelPool;
use evaluator::source::{load, ModelSource};

/// Most texts in one call (the gateway's `input` bound).
const MAX_INPUTS: usize = 2048;

/// How `fusion embed` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EmbedFormat {
    /// One line per text: token count, then the first values.
    Text,
    /// OpenAI's response shape (`data[].embedding`, `usage`), in full.
    Json,
}

/// Arguments of `fusion embed`.
#[derive(Args)]
#[command(group(ArgGroup::new("what").required(true).args(["merge", "model"])))]
pub struct EmbedArgs {
    /// A checkpoint folder (config.json, safetensors, tokenizer.json and,
    /// for an embedding model, its sentence-transformers files).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A compact merge spec over the pool's checkpoints
    /// (`task_arithmetic(sre,jobs;scaling_coefficient=0.5)`) or a checkpoint
    /// name of the pool. Needs --pool.
    #[arg(long, requires = "pool", conflicts_with = "model")]
    merge: Option<String>,
    /// pool.yaml: resolves checkpoint names.
    #[arg(long)]
    pool: Option<PathBuf>,
    /// The texts (repeatable, or several after one --input).
    #[arg(long, required = true, num_args = 1..)]
    input: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = EmbedFormat::Text)]
    format: EmbedFormat,
    /// Where to merge and run: auto, cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Runs `fusion embed`: the embeddings on stdout, a summary on stderr.
pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    if args.input.len() > MAX_INPUTS {
        bail!("at most {MAX_INPUTS} texts, got {}", args.input.len());
    }
    if let Some(i) = args.input.iter().position(String::is_empty) {
        bail!("input {i} is empty");
    }
    let pool = args.pool.as_deref().map(ModelPool::load).transpose()?;
    let source = match (&args.merge, &args.model) {
        (Some(m), None) => ModelSource::parse(m, pool.as_ref().expect("clap requires --pool"))?,
        (None, Some(dir)) => ModelSource::Folder(dir.clone()),
        _ => bail!("give --model DIR, or --merge SPEC --pool POOL.yaml"),
    };
    let device = runtime::device::parse_device(&args.device)?;
    let loaded = load(&source, pool.as_ref(), &device)
        .with_context(|| format!("loading `{}`", source.describe()))?;
    let out = loaded.model.embed(&args.input)?;
    match args.format {
        EmbedFormat::Json => {
            let data: Vec<serde_json::Value> = out
                .vectors
                .iter()
                .enumerate()
                .map(|(index, v)| {
                    serde_json::json!({"object": "embedding", "index": index, "embedding": v})
                })
                .collect();
            let doc = serde_json::json!({
                "object": "list",
                "data": data,
                "model": source.describe(),
                "usage": {"prompt_tokens": out.tokens, "total_tokens": out.tokens,
                          "truncated_inputs": out.truncated},
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        EmbedFormat::Text => {
            for (text, v) in args.input.iter().zip(&out.vectors) {
                let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:+.5}")).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                println!(
                    "{:?}\n  dim {} norm {norm:.5} [{} …]",
                    text,
                    v.len(),
                    head.join(", ")
                );
            }
        }
    }
    eprintln!(
        "embedded {} texts ({} tokens, {} truncated) with `{}` ({}) in {:.2}s to load",
        out.vectors.len(),
        out.tokens,
        out.truncated,
        source.describe(),
        loaded.model.kind().task(),
        loaded.seconds
    );
    Ok(())
}
