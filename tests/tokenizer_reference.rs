//! Token ids as Hugging Face gives them: the project's tokenizer against the
//! Python `tokenizers` package (`encode(text, add_special_tokens=True|False)`)
//! and, when installed, `transformers` (`AutoTokenizer(text)` and
//! `apply_chat_template(tokenize=True, add_generation_prompt=True)`), via
//! `tests/reference/check_tokenizers.py`, on the demo pool's byte-level
//! tokenizer (its post-processor adds the BOS the models were trained with),
//! a Llama-3-style tokenizer (byte-level BPE with merges, a split regex and a
//! `Sequence` post-processor that adds `<|begin_of_text|>`) and any model
//! folder named in `FUSION_TOKENIZER_DIRS` (colon-separated; the MiniLM
//! WordPiece tokenizer of `fusion zoo fetch minilm`, say). Skipped, with
//! the reason printed, where python3 lacks `tokenizers` (`make test`
//! installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use runtime::generate::bytelevel::{self, byte_to_char};
use runtime::generate::{ChatMessage, ChatTemplate, TextTokenizer};
use serde_json::{json, Value};

const TEXTS: &[&str] = &[
    "2+2=",
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space, trailing space ",
    "<s>a marker inside</s>",
    "Kubernetes pod CrashLoopBackOff: état, naïve, 東京",
    "",
];

/// The Llama 3 pre-tokenizer's split pattern.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const LLAMA3_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// A small Llama-3-style tokenizer folder.
fn write_llama3_style(dir: &Path) {
    let chars = byte_to_char();
    let mut vocab = serde_json::Map::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let g = chars[b' ' as usize];
    let merges = [
        (format!("{g}"), "t".to_string()),
        ("h".into(), "e".into()),
        (format!("{g}t"), "he".into()),
        ("o".into(), "r".into()),
        ("l".into(), "d".into()),
    ];
    let mut next = 256;
    for (a, b) in &merges {
        vocab.insert(format!("{a}{b}"), json!(next));
        next += 1;
    }
    let specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ];
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            vocab.insert(t.to_string(), json!(next + i));
            json!({"id": next + i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let bos = next;
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level,
        ]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos], "tokens": ["<|begin_of_text|>"]}}},
        ]},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": true,
                  "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "model_max_length": 8192,
        "chat_template": LLAMA3_TEMPLATE,
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// The project's ids for one tokenizer folder.
fn case(name: &str, dir: &Path) -> Value {
    let t = TextTokenizer::load(dir).unwrap();
    let texts: Vec<&str> = TEXTS.to_vec();
    let with: Vec<Vec<u32>> = texts
        .iter()
        .map(|x| t.encode_with_special_tokens(x).unwrap())
        .collect();
    let without: Vec<Vec<u32>> = texts.iter().map(|x| t.encode(x).unwrap()).collect();
    let chats: Vec<Value> = match t.config().chat_template.as_deref() {
        None => Vec::new(),
        Some(source) => {
            let template = ChatTemplate::new(
                Some(source),
                t.config().bos_token.as_deref(),
                t.config().eos_token.as_deref(),
            )
            .unwrap();
            [
                vec![ChatMessage::new("user", "2+2=")],
                vec![
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Name the capital of France."),
                    ChatMessage::new("assistant", "Paris."),
                    ChatMessage::new("user", "And of Japan? </s> <s>"),
                ],
            ]
            .into_iter()
            .map(|messages| {
                let ids = t.encode(&template.render(&messages, true).unwrap()).unwrap();
                json!({
                    "messages": messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect::<Vec<_>>(),
                    "ids": ids,
                })
            })
            .collect()
        }
    };
    json!({"name": name, "dir": dir, "texts": texts, "with_special": with,
           "without_special": without, "chats": chats})
}

#[test]
fn token_ids_match_hugging_face() {
    let probe = Command::new("python3")
        .args(["-c", "import tokenizers"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("SKIPPED token_ids_match_hugging_face: python3 with the `tokenizers` package is not installed (run `make test`)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let demo = tmp.path().join("demo");
    let llama3 = tmp.path().join("llama3");
    std::fs::create_dir_all(&demo).unwrap();
    std::fs::create_dir_all(&llama3).unwrap();
    bytelevel::write_tokenizer_files(&demo, 256).unwrap();
    write_llama3_style(&llama3);
    let mut cases = vec![case("demo", &demo), case("llama3-style", &llama3)];
    for extra in std::env::var("FUSION_TOKENIZER_DIRS")
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
    {
        let dir = PathBuf::from(extra);
        cases.push(case(&dir.display().to_string(), &dir));
    }
    // The conventions themselves, independent of the reference.
    let t = TextTokenizer::load(&demo).unwrap();
    assert_eq!(
        t.encode_with_special_tokens("ab").unwrap(),
        vec![bytelevel::BOS, 97, 98]
    );
    let t = TextTokenizer::load(&llama3).unwrap();
    let bos = t.token_to_id("<|begin_of_text|>").unwrap();
    assert_eq!(t.encode_with_special_tokens("the").unwrap()[0], bos);
    assert_ne!(t.encode("the").unwrap()[0], bos);

    let path = tmp.path().join("cases.json");
    std::fs::write(&path, serde_json::to_string(&cases).unwrap()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/check_tokenizers.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(&path)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "token ids differ from Hugging Face:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 failures"), "{stdout}");
}
