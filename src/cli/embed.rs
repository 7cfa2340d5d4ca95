//! `fusion embed`: embeddings of texts (or, for an image model, of images)
//! from a checkpoint folder or a merge of a pool's checkpoints, for
//! checking by hand (the same computation as `POST /v1/embeddings`).

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

/// Which runtime runs an ONNX checkpoint folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EmbedRuntime {
    /// What the folder holds: safetensors on candle, `model.onnx` on ONNX Runtime.
    Auto,
    /// The candle encoder, also on an ONNX folder's weights (read from its
    /// initializers): a parity check by hand.
    Candle,
}

/// Arguments of `fusion embed`.
#[derive(Args)]
#[command(group(ArgGroup::new("what").required(true).args(["merge", "model"])))]
#[command(group(ArgGroup::new("inputs").required(true).args(["input", "image"])))]
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
    #[arg(long, num_args = 1..)]
    input: Vec<String>,
    /// Images for an image model: PNG or JPEG files, or
    /// `data:image/png;base64,...` URLs (repeatable, or several after one
    /// --image).
    #[arg(long, num_args = 1.., conflicts_with = "input")]
    image: Vec<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = EmbedFormat::Text)]
    format: EmbedFormat,
    /// Where to merge and run: auto, cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// With --model: `candle` runs an ONNX folder's weights on the candle
    /// encoder instead of ONNX Runtime.
    #[arg(long, value_enum, default_value_t = EmbedRuntime::Auto, requires = "model")]
    runtime: EmbedRuntime,
}

/// Runs `fusion embed`: the embeddings on stdout, a summary on stderr.
pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    if args.input.len() > MAX_INPUTS || args.image.len() > MAX_INPUTS {
        bail!(
            "at most {MAX_INPUTS} inputs, got {}",
            args.input.len().max(args.image.len())
        );
    }
    let images = args
        .image
        .iter()
        .map(|i| {
            if i.starts_with("data:") {
                runtime::vision::RgbImage::from_data_url(i, "--image (data URL)")
            } else {
                runtime::vision::RgbImage::open(std::path::Path::new(i))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
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
    let started = std::time::Instant::now();
    let (model, load_seconds) = match (&args.model, args.runtime) {
        (Some(dir), EmbedRuntime::Candle) => {
            let opts = runtime::model::ModelOptions {
                device: device.clone(),
                ..Default::default()
            };
            let encoder = runtime::encoder::Encoder::load(dir, &opts)
                .with_context(|| format!("loading `{}` on candle", dir.display()))?;
            let model = runtime::Runnable::Embedding(
                runtime::encoder::SentenceEncoder::from_encoder(encoder, dir)?,
            );
            (model, started.elapsed().as_secs_f64())
        }
        _ => {
            let loaded = load(&source, pool.as_ref(), &device)
                .with_context(|| format!("loading `{}`", source.describe()))?;
            (loaded.model, loaded.seconds)
        }
    };
    let embed_start = std::time::Instant::now();
    let (out, labels) = if images.is_empty() {
        (model.embed(&args.input)?, args.input.clone())
    } else {
        let vectors = model.embed_images_until(&images, &|| false)?;
        let out = runtime::Embedded {
            vectors,
            tokens: 0,
            truncated: 0,
        };
        (out, args.image.clone())
    };
    let embed_seconds = embed_start.elapsed().as_secs_f64();
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
            for (text, v) in labels.iter().zip(&out.vectors) {
                let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:+.5}")).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                let shown: String = text.chars().take(64).collect();
                let shown = if shown.len() < text.len() {
                    format!("{shown}…")
                } else {
                    shown
                };
                println!(
                    "{:?}\n  dim {} norm {norm:.5} [{} …]",
                    shown,
                    v.len(),
                    head.join(", ")
                );
            }
        }
    }
    let runtime = match &model {
        runtime::Runnable::Embedding(e) => e.encoder().runtime(),
        runtime::Runnable::Text(_) | runtime::Runnable::Vision(_) => "candle",
    };
    if !images.is_empty() {
        eprintln!(
            "embedded {} images with `{}` ({}, {runtime}) in {embed_seconds:.2}s, \
             {load_seconds:.2}s to load",
            out.vectors.len(),
            source.describe(),
            model.kind().task(),
        );
        return Ok(());
    }
    eprintln!(
        "embedded {} texts ({} tokens, {} truncated) with `{}` ({}, {runtime}) in {embed_seconds:.2}s \
         ({:.0} tokens/s), {load_seconds:.2}s to load",
        out.vectors.len(),
        out.tokens,
        out.truncated,
        source.describe(),
        model.kind().task(),
        out.tokens as f64 / embed_seconds.max(1e-9),
    );
    Ok(())
}
