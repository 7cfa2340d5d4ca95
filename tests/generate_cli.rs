//! End-to-end tests of `fusion generate` through the real binary, on a random
//! tiny Llama written with the byte-level tokenizer. Expected completions
//! come from a greedy loop over the model's plain forward pass.

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Tensor};
use runtime::generate::bytelevel::{self, encode_bytes, ASSISTANT, BOS, EOS, USER};
use runtime::model::random::{random_weights, write_checkpoint};
use runtime::model::{Model, ModelConfig, ModelOptions};

const MAX_POS: usize = 128;

fn checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let c = ModelConfig::from_json(
        &format!(
            r#"{{"model_type":"llama","vocab_size":{},"hidden_size":32,"intermediate_size":64,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "max_position_embeddings":{MAX_POS},"bos_token_id":{BOS},"eos_token_id":{EOS}}}"#,
            bytelevel::VOCAB_SIZE
        ),
        Path::new("config.json"),
    )
    .unwrap();
    write_checkpoint(
        dir.path(),
        &c,
        &random_weights(&c, 11, 0.3).unwrap(),
        DType::F32,
    )
    .unwrap();
    bytelevel::write_tokenizer_files(dir.path(), MAX_POS).unwrap();
    dir
}

fn fusion(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fusion"))
        .args(args)
        .output()
        .expect("run fusion")
}

fn stdout_ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "fusion failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// Greedy decoding by hand (full forward per step) and the text of the
/// generated tokens (special tokens left out, bytes decoded lossily).
fn greedy_text(dir: &Path, prompt: &[u32], max_tokens: usize) -> (String, Vec<u32>) {
    let m = Model::load(dir, &ModelOptions::default()).unwrap();
    let mut ids = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let x = Tensor::new(ids.as_slice(), m.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let l = m.forward(&x, None).unwrap().squeeze(0).unwrap();
        let last = l.get(ids.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        let best = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b }) as u32;
        out.push(best);
        ids.push(best);
        if best == EOS {
            break;
        }
    }
    let bytes: Vec<u8> = out.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
    (String::from_utf8_lossy(&bytes).into_owned(), out)
}

fn model_arg(dir: &tempfile::TempDir) -> String {
    dir.path().to_str().unwrap().to_string()
}

#[test]
fn greedy_prompt_is_deterministic_and_matches_the_forward_pass() {
    let dir = checkpoint();
    let m = model_arg(&dir);
    let args = [
        "generate",
        "--model",
        &m,
        "--prompt",
        "hello",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
    ];
    let a = fusion(&args);
    let b = fusion(&args);
    let text = stdout_ok(&a);
    assert_eq!(text, stdout_ok(&b));
    let prompt = [vec![BOS], encode_bytes("hello")].concat();
    let (want, tokens) = greedy_text(dir.path(), &prompt, 16);
    assert_eq!(text, format!("{want}\n"));
    let stderr = String::from_utf8_lossy(&a.stderr);
    assert!(
        stderr.contains(&format!("completion_tokens={}", tokens.len())),
        "{stderr}"
    );
    assert!(stderr.contains("prompt_tokens=6"), "{stderr}");
    let reason = if tokens.last() == Some(&EOS) {
        "stop"
    } else {
        "length"
    };
    assert!(
        stderr.contains(&format!("finish_reason={reason}")),
        "{stderr}"
    );
    // Streaming prints the same text.
    let mut streamed = args.to_vec();
    streamed.push("--stream");
    assert_eq!(stdout_ok(&fusion(&streamed)), text);
}

#[test]
fn chat_goes_through_the_template() {
    let dir = checkpoint();
    let m = model_arg(&dir);
    let o = fusion(&[
        "generate",
        "--model",
        &m,
        "--chat",
        "hi",
        "--temperature",
        "0",
        "--max-tokens",
        "10",
    ]);
    // <s><|user|>hi<|assistant|>
    let prompt = [vec![BOS, USER], encode_bytes("hi"), vec![ASSISTANT]].concat();
    let (want, _) = greedy_text(dir.path(), &prompt, 10);
    assert_eq!(stdout_ok(&o), format!("{want}\n"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("prompt_tokens=5"), "{stderr}");
}

#[test]
fn a_seed_reproduces_a_sampled_completion() {
    let dir = checkpoint();
    let m = model_arg(&dir);
    let run = |seed: &str| {
        stdout_ok(&fusion(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "hello",
            "--seed",
            seed,
            "--max-tokens",
            "24",
            "--top-p",
            "0.95",
        ]))
    };
    let a = run("1");
    assert_eq!(a, run("1"));
    assert_ne!(a, run("2"));
}

#[test]
fn stop_sequences_end_the_output() {
    let dir = checkpoint();
    let m = model_arg(&dir);
    let prompt = [vec![BOS], encode_bytes("hello")].concat();
    let (full, _) = greedy_text(dir.path(), &prompt, 16);
    let chars: Vec<char> = full.chars().collect();
    let from = (1..chars.len() - 1)
        .find(|&i| chars[i..i + 2].iter().all(|c| c.is_ascii_graphic()))
        .expect("fixture text has two printable ASCII characters in a row");
    let stop: String = chars[from..from + 2].iter().collect();
    let o = fusion(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "hello",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        "--stop",
        &stop,
        "--stream",
    ]);
    let at = full.find(&stop).unwrap();
    assert_eq!(stdout_ok(&o), format!("{}\n", &full[..at]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("finish_reason=stop"));
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = checkpoint();
    let m = model_arg(&dir);
    let o = fusion(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "x",
        "--temperature",
        "3",
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("`temperature`") && e.contains("between 0 and 2"),
        "{e}"
    );
    let o = fusion(&["generate", "--model", &m]);
    assert!(!o.status.success());
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let o = fusion(&["generate", "--model", &m, "--prompt", "x"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("tokenizer.json"), "{e}");
}
