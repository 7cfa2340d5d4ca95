//! `fusion generate`: try a checkpoint from the command line.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::{ArgGroup, Args};
use runtime::generate::{ChatMessage, SamplingParams};
use runtime::model::ModelOptions;

/// Arguments of `fusion generate`.
#[derive(Args)]
#[command(group(ArgGroup::new("input").required(true).args(["prompt", "chat"])))]
pub struct GenerateArgs {
    /// Checkpoint folder (config.json, safetensors, tokenizer.json, tokenizer_config.json).
    #[arg(long)]
    model: PathBuf,
    /// Raw text to complete (BOS is prepended when the tokenizer has one).
    #[arg(long)]
    prompt: Option<String>,
    /// A user message, rendered with the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// A system message before the user message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Parse special-token markers (`<|assistant|>`, `</s>`) written in the
    /// --chat/--system text, as Hugging Face tokenizers do by default;
    /// without it they are plain text and only the template inserts special
    /// tokens (as the gateway does with `server.split_special_tokens`).
    #[arg(long, requires = "chat")]
    parse_special_tokens: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature in [0, 2]; 0 is greedy decoding.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Sample among the K most likely tokens only.
    #[arg(long)]
    top_k: Option<usize>,
    /// Seed of the sampler (the same seed gives the same completion).
    #[arg(long)]
    seed: Option<u64>,
    /// OpenAI frequency penalty in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// OpenAI presence penalty in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Stop before this text (repeatable; not printed).
    #[arg(long)]
    stop: Vec<String>,
    /// Print tokens as they are generated.
    #[arg(long)]
    stream: bool,
    /// Where to run: auto, cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Runs `fusion generate`: the completion on stdout, a summary on stderr.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        frequency_penalty: args.frequency_penalty,
        presence_penalty: args.presence_penalty,
        stop: args.stop,
    };
    params.validate()?;
    let opts = ModelOptions {
        device: runtime::device::parse_device(&args.device)?,
        ..Default::default()
    };
    let model = merger::load_text_model(&args.model, &opts)?;
    let prompt = match (args.prompt, args.chat) {
        (Some(p), _) => model.encode(&p)?,
        (None, Some(user)) => {
            let mut messages = Vec::new();
            if let Some(s) = args.system {
                messages.push(ChatMessage::new("system", s));
            }
            messages.push(ChatMessage::new("user", user));
            model.encode_chat(&messages, !args.parse_special_tokens)?
        }
        (None, None) => anyhow::bail!("pass --prompt TEXT or --chat TEXT"),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let start = Instant::now();
    let mut write_error = None;
    let mut first_token = None;
    let completion = model.generate(&prompt, &params, &mut |event| {
        first_token.get_or_insert_with(|| start.elapsed().as_secs_f64());
        if args.stream && !event.text.is_empty() {
            if let Err(e) = out
                .write_all(event.text.as_bytes())
                .and_then(|_| out.flush())
            {
                // The reader went away (a closed pipe): stop generating.
                write_error = Some(e);
                return false;
            }
        }
        true
    })?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(e) = write_error {
        return Err(anyhow::Error::new(e).context("writing the completion to stdout"));
    }
    if !args.stream {
        out.write_all(completion.text.as_bytes())?;
    }
    writeln!(out)?;
    out.flush()?;
    // Decoding speed: the tokens after the first over the time after it
    // (the first token pays for the prompt).
    let ttft = first_token.unwrap_or(seconds);
    let decode_rate =
        (completion.completion_tokens.saturating_sub(1)) as f64 / (seconds - ttft).max(1e-9);
    eprintln!(
        "prompt_tokens={} completion_tokens={} finish_reason={} time_to_first_token_s={ttft:.4} \
         seconds={seconds:.3} decode_tokens_per_second={decode_rate:.1}",
        completion.prompt_tokens,
        completion.completion_tokens,
        completion.finish_reason.as_str(),
    );
    Ok(())
}
