//! The merged model's tokenizer, as mergekit builds it: `tokenizer_source`
//! (`base`, `union` or a model), the `tokenizer:` block (`source`,
//! `tokens`, `pad_to_multiple_of`) and `chat_template`.
//!
//! **Output vocabulary.** `base` keeps the base's tokenizer (the first
//! model's without a base), stripped of tokens whose id is past its
//! config's `vocab_size`; a model name takes that model's tokenizer as it
//! is; `union` starts from the stripped base and adds, in model order (the
//! base first), every token of the other models it lacks, as added tokens
//! at the next free ids (what `tokenizer.add_tokens` does in transformers),
//! then their added tokens (special or not, first settings win). Tokens
//! named under `tokenizer.tokens` are added when missing.
//!
//! **Embedding rows.** Every input's embedding matrices (`embed_tokens`,
//! `wte`, `word_embeddings`, `lm_head`: the tensors whose rows are the
//! vocabulary) are rebuilt over the output vocabulary before the merge:
//! token v takes the input's own row for v when it has the token; a token
//! it lacks takes a default row, chosen as mergekit's `PermutedEmbeddings`
//! does:
//! - a token with a `tokens.<tok>.source`: that model's row (`source: M`),
//!   another token's row (`{kind: model_token, model, token | token_id}`),
//!   or zeros (`{kind: zero}`); with `force: true` every input takes it,
//!   also those that have the token;
//! - else a token only one input has: that input's row;
//! - else a token no input has: zeros;
//! - else a token the base has: the base's row;
//! - else the mean of the rows of the inputs that have it.
//!
//! With `pad_to_multiple_of` the rows are padded up to a multiple of it,
//! each padding row the mean of the vocabulary's rows. The output's
//! `config.json` gets `vocab_size` = the row count.
//!
//! **Chat template.** `chat_template` sets `tokenizer_config.json`'s
//! `chat_template`: `auto` (the template most of the models have), one of
//! the named templates `chatml` or `llama3`, or a Jinja template written
//! out (at least 20 characters with a `{`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{MergeError, Result};
use runtime::checkpoint::{Checkpoint, TensorBuf};

/// Where the output vocabulary comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The base's (mergekit's default).
    Base,
    /// The union of every model's.
    Union,
    /// This model's.
    Model(String),
}

/// Where a token's default embedding row comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RowSource {
    /// Zeros.
    Zero,
    /// The token's row in this model.
    Model(String),
    /// Another token's row in a model, by id or by token.
    ModelToken {
        /// The model.
        model: String,
        /// The row.
        token_id: Option<usize>,
        /// The token whose row it is (looked up in the model's vocabulary).
        token: Option<String>,
    },
}

/// The settings of one token under `tokenizer.tokens`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenRow {
    /// Its default row (`None`: chosen as for any token).
    pub source: Option<RowSource>,
    /// Every input takes the default row, also those that have the token.
    pub force: bool,
}

/// The tokenizer settings of a mergekit config.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenizerSpec {
    /// Where the vocabulary comes from.
    pub source: Source,
    /// Per-token embedding settings (these tokens are added when missing).
    pub tokens: BTreeMap<String, TokenRow>,
    /// Pad the rows to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    /// The chat template to set.
    pub chat_template: Option<String>,
    /// The config's `base_model` (whose tokenizer `base` and `union` start
    /// from), also for methods that merge without a base.
    pub base_model: Option<String>,
}

impl Default for TokenizerSpec {
    fn default() -> Self {
        TokenizerSpec {
            source: Source::Base,
            tokens: BTreeMap::new(),
            pad_to_multiple_of: None,
            chat_template: None,
            base_model: None,
        }
    }
}

impl TokenizerSpec {
    /// True when the output keeps the reference's tokenizer files as they
    /// are (what every merge did before these settings).
    pub fn is_plain(&self) -> bool {
        self.source == Source::Base
            && self.tokens.is_empty()
            && self.pad_to_multiple_of.is_none()
            && self.chat_template.is_none()
    }

    /// True when the vocabulary, and so the embedding rows, may change.
    fn changes_vocabulary(&self) -> bool {
        self.source != Source::Base || !self.tokens.is_empty() || self.pad_to_multiple_of.is_some()
    }
}

/// A vocabulary: token → id, ids below the model's `vocab_size`.
#[derive(Debug, Clone, Default)]
struct Vocab {
    ids: HashMap<String, usize>,
}

impl Vocab {
    fn len(&self) -> usize {
        self.ids.len()
    }
    fn get(&self, token: &str) -> Option<usize> {
        self.ids.get(token).copied()
    }
    fn next_id(&self) -> usize {
        self.ids.values().max().map_or(0, |m| m + 1)
    }
    /// Tokens by id (ids are dense in the vocabularies we build).
    fn by_id(&self) -> Vec<(usize, &str)> {
        let mut v: Vec<(usize, &str)> = self.ids.iter().map(|(t, &i)| (i, t.as_str())).collect();
        v.sort_unstable();
        v
    }
}

/// One model's tokenizer: its `tokenizer.json` and vocabulary.
struct ModelTokenizer {
    json: Value,
    /// Every token (model vocabulary and added tokens) below `vocab_size`.
    vocab: Vocab,
    /// Tokens that are added tokens, in id order, with their settings.
    added: Vec<Value>,
}

fn tokenizer_err(dir: &Path, reason: String) -> MergeError {
    MergeError::ModelConfig {
        path: dir.join("tokenizer.json"),
        reason,
    }
}

impl ModelTokenizer {
    /// Reads `ck`'s tokenizer.json, keeping the tokens below its config's
    /// `vocab_size` (and below its embedding rows when it has no config
    /// value).
    fn read(ck: &Checkpoint) -> Result<Self> {
        let dir = ck.dir();
        let path = dir.join("tokenizer.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            tokenizer_err(
                dir,
                format!(
                    "cannot be read ({e}); merging vocabularies needs each model's tokenizer.json"
                ),
            )
        })?;
        let mut json: Value = serde_json::from_str(&text)
            .map_err(|e| tokenizer_err(dir, format!("is not valid JSON: {e}")))?;
        let limit = ck
            .config()?
            .and_then(|c| c.get("vocab_size").and_then(Value::as_u64))
            .map(|n| n as usize)
            .or_else(|| embedding_rows(ck))
            .unwrap_or(usize::MAX);
        let mut ids = HashMap::new();
        let model = json
            .get("model")
            .ok_or_else(|| tokenizer_err(dir, "has no `model`".into()))?;
        match model.get("vocab") {
            Some(Value::Object(map)) => {
                for (tok, id) in map {
                    let id = id.as_u64().ok_or_else(|| {
                        tokenizer_err(dir, format!("vocabulary entry `{tok}` has no integer id"))
                    })? as usize;
                    if id < limit {
                        ids.insert(tok.clone(), id);
                    }
                }
            }
            // Unigram: [[token, score], ...], the id is the index.
            Some(Value::Array(list)) => {
                for (id, entry) in list.iter().enumerate() {
                    let tok = entry.get(0).and_then(Value::as_str).ok_or_else(|| {
                        tokenizer_err(dir, format!("vocabulary entry {id} is not [token, score]"))
                    })?;
                    if id < limit {
                        ids.insert(tok.to_string(), id);
                    }
                }
            }
            _ => {
                return Err(tokenizer_err(
                    dir,
                    "has no `model.vocab` (a BPE, WordPiece, WordLevel or Unigram vocabulary)"
                        .into(),
                ))
            }
        }
        let mut added = Vec::new();
        for entry in json
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(id), Some(content)) = (
                entry.get("id").and_then(Value::as_u64),
                entry.get("content").and_then(Value::as_str),
            ) else {
                return Err(tokenizer_err(
                    dir,
                    "an added token lacks `id` or `content`".into(),
                ));
            };
            if (id as usize) < limit {
                ids.insert(content.to_string(), id as usize);
                added.push(entry.clone());
            }
        }
        strip(&mut json, limit);
        Ok(ModelTokenizer {
            json,
            vocab: Vocab { ids },
            added,
        })
    }

    fn is_added(&self, token: &str) -> bool {
        self.added
            .iter()
            .any(|a| a.get("content").and_then(Value::as_str) == Some(token))
    }

    /// Adds `token` (an added token's settings, or a plain new token) as
    /// transformers' `add_tokens` does: a token already in the vocabulary
    /// keeps its id, a new one takes the next free id.
    fn add(&mut self, token: &str, settings: Option<&Value>) {
        if self.is_added(token) {
            return;
        }
        let id = self
            .vocab
            .get(token)
            .unwrap_or_else(|| self.vocab.next_id());
        let mut entry = settings.cloned().unwrap_or_else(|| {
            json!({
                "content": token,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": true,
                "special": false,
            })
        });
        entry["id"] = json!(id);
        self.vocab.ids.insert(token.to_string(), id);
        self.added.push(entry.clone());
        match self
            .json
            .get_mut("added_tokens")
            .and_then(Value::as_array_mut)
        {
            Some(list) => list.push(entry),
            None => self.json["added_tokens"] = json!([entry]),
        }
    }
}

/// Drops the tokens with an id at or past `limit` from a tokenizer.json
/// (its vocabulary, added tokens and BPE merges), as mergekit's
/// `get_stripped_tokenizer` does.
fn strip(json: &mut Value, limit: usize) {
    let mut gone: Vec<String> = Vec::new();
    if let Some(map) = json
        .pointer_mut("/model/vocab")
        .and_then(Value::as_object_mut)
    {
        map.retain(|tok, id| {
            let keep = id.as_u64().is_some_and(|i| (i as usize) < limit);
            if !keep {
                gone.push(tok.clone());
            }
            keep
        });
    }
    if let Some(list) = json.get_mut("added_tokens").and_then(Value::as_array_mut) {
        list.retain(|e| {
            e.get("id")
                .and_then(Value::as_u64)
                .is_some_and(|i| (i as usize) < limit)
        });
    }
    if gone.is_empty() {
        return;
    }
    if let Some(merges) = json
        .pointer_mut("/model/merges")
        .and_then(Value::as_array_mut)
    {
        merges.retain(|m| {
            let parts: Vec<&str> = match m {
                Value::String(s) => s.split(' ').collect(),
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => return true,
            };
            !parts.iter().any(|p| gone.iter().any(|g| g == p))
        });
    }
}

/// The row count of a checkpoint's input embedding.
fn embedding_rows(ck: &Checkpoint) -> Option<usize> {
    ck.tensors()
        .iter()
        .find(|(n, e)| is_embedding_name(n) && !n.contains("lm_head") && e.shape.len() == 2)
        .map(|(_, e)| e.shape[0])
}

/// Whether a tensor's rows are the vocabulary (by its name).
fn is_embedding_name(name: &str) -> bool {
    name.ends_with("embed_tokens.weight")
        || name.ends_with("wte.weight")
        || name.ends_with("word_embeddings.weight")
        || name == "lm_head.weight"
        || name.ends_with(".lm_head.weight")
}

/// A default row of the output vocabulary.
#[derive(Debug, Clone)]
enum DefaultRow {
    /// No default is needed (every input has the token).
    None,
    Zero,
    /// Row `row` of input `input`.
    Row {
        input: usize,
        row: usize,
    },
    /// The mean of these inputs' own rows for the token.
    Mean(Vec<usize>),
}

/// The output tokenizer and each input's rows over it, built against the
/// checkpoints of a merge.
pub struct TokenizerPlan {
    spec: TokenizerSpec,
    /// The output tokenizer.json (`None`: the reference's, unchanged).
    json: Option<Value>,
    /// Output vocabulary size and row count (padded).
    vocab_len: usize,
    rows: usize,
    /// Per input, per output token id: the input's own row, if it has it.
    perms: Vec<Vec<Option<usize>>>,
    defaults: Vec<DefaultRow>,
    force: Vec<bool>,
    /// The chat template text to set.
    chat_template: Option<String>,
}

impl TokenizerPlan {
    /// Builds the output vocabulary of `spec`, a union over `models` (every
    /// model of the config, in order), and the rows of the merge's
    /// `inputs` (the base first when `has_base`; a layer slice's inputs are
    /// some of the models); `open` opens the models the settings name that
    /// are not inputs (a `base_model` a method merges without, a tokenizer
    /// source).
    pub fn new(
        spec: &TokenizerSpec,
        models: &[Arc<Checkpoint>],
        inputs: &[Arc<Checkpoint>],
        has_base: bool,
        open: crate::merge::Opener,
    ) -> Result<Self> {
        let chat_template = spec
            .chat_template
            .as_deref()
            .map(|t| chat_template(t, inputs))
            .transpose()?
            .flatten();
        let mut plan = TokenizerPlan {
            spec: spec.clone(),
            json: None,
            vocab_len: 0,
            rows: 0,
            perms: Vec::new(),
            defaults: Vec::new(),
            force: Vec::new(),
            chat_template,
        };
        if !spec.changes_vocabulary() {
            return Ok(plan);
        }
        let find = |name: &str| -> Option<usize> {
            inputs
                .iter()
                .position(|c| crate::slices::same_model(c.name(), name))
        };
        let base_ck = match &spec.base_model {
            Some(b) => match find(b) {
                Some(i) => inputs[i].clone(),
                None => open(b)?,
            },
            None => inputs[0].clone(),
        };
        let tokenizers = inputs
            .iter()
            .map(|c| ModelTokenizer::read(c))
            .collect::<Result<Vec<_>>>()?;
        let mut out = match &spec.source {
            Source::Base => ModelTokenizer::read(&base_ck)?,
            Source::Model(m) => {
                let ck = match find(m) {
                    Some(i) => inputs[i].clone(),
                    None => open(m)?,
                };
                let mut t = ModelTokenizer::read(&ck)?;
                // As given: mergekit loads a source model's tokenizer unstripped.
                t.json = serde_json::from_str(
                    &std::fs::read_to_string(ck.dir().join("tokenizer.json"))
                        .map_err(|e| tokenizer_err(ck.dir(), e.to_string()))?,
                )
                .map_err(|e| tokenizer_err(ck.dir(), e.to_string()))?;
                t
            }
            Source::Union => {
                let base_tok = ModelTokenizer::read(&base_ck)?;
                let others = models
                    .iter()
                    .filter(|c| !crate::slices::same_model(c.name(), base_ck.name()))
                    .map(|c| ModelTokenizer::read(c))
                    .collect::<Result<Vec<_>>>()?;
                let mut order: Vec<&ModelTokenizer> = vec![&base_tok];
                order.extend(others.iter());
                let mut out = ModelTokenizer::read(&base_ck)?;
                let mut added: Vec<(String, Value)> = Vec::new();
                let mut plain: Vec<String> = Vec::new();
                for t in &order {
                    for (_, tok) in t.vocab.by_id() {
                        if !t.is_added(tok) && !plain.iter().any(|p| p == tok) {
                            plain.push(tok.to_string());
                        }
                    }
                    for a in &t.added {
                        let content = a["content"].as_str().unwrap_or_default().to_string();
                        if !added.iter().any(|(c, _)| *c == content) {
                            added.push((content, a.clone()));
                        }
                    }
                }
                for tok in &plain {
                    if added.iter().any(|(c, _)| c == tok) {
                        continue;
                    }
                    if base_tok.vocab.get(tok).is_none() {
                        out.add(tok, None);
                    }
                }
                for (content, settings) in &added {
                    let mut s = settings.clone();
                    if let Some(m) = s.as_object_mut() {
                        m.remove("id");
                    }
                    out.add(content, Some(&s));
                }
                out
            }
        };
        for tok in spec.tokens.keys() {
            out.add(tok, None);
        }
        let vocab = &out.vocab;
        let vocab_len = vocab.len();
        if let Some((id, tok)) = vocab
            .by_id()
            .into_iter()
            .enumerate()
            .find(|(i, (id, _))| i != id)
            .map(|(_, p)| p)
        {
            return Err(tokenizer_err(
                base_ck.dir(),
                format!("the output vocabulary's ids have a gap: `{tok}` has id {id}, past its {vocab_len} tokens"),
            ));
        }
        let rows = match spec.pad_to_multiple_of {
            Some(m) if m > 0 && vocab_len % m != 0 => (vocab_len / m + 1) * m,
            _ => vocab_len,
        };
        let by_id = vocab.by_id();
        let perms: Vec<Vec<Option<usize>>> = tokenizers
            .iter()
            .map(|t| by_id.iter().map(|(_, tok)| t.vocab.get(tok)).collect())
            .collect();
        let base_input = if has_base { Some(0) } else { None };
        let mut defaults = Vec::with_capacity(vocab_len);
        let mut force = Vec::with_capacity(vocab_len);
        for (id, tok) in &by_id {
            let present: Vec<usize> = (0..inputs.len())
                .filter(|&k| perms[k][*id].is_some())
                .collect();
            let cfg = spec.tokens.get(*tok);
            force.push(cfg.is_some_and(|c| c.force));
            let d = match cfg.and_then(|c| c.source.as_ref()) {
                Some(RowSource::Zero) => DefaultRow::Zero,
                Some(RowSource::Model(m)) => {
                    let k = find(m).ok_or_else(|| not_an_input(m, tok))?;
                    let row = perms[k][*id].ok_or_else(|| {
                        MergeError::Spec(format!(
                            "tokenizer.tokens.{tok}: `{m}` does not have the token `{tok}`"
                        ))
                    })?;
                    DefaultRow::Row { input: k, row }
                }
                Some(RowSource::ModelToken {
                    model,
                    token_id,
                    token,
                }) => {
                    let k = find(model).ok_or_else(|| not_an_input(model, tok))?;
                    let row = match (token_id, token) {
                        (Some(r), _) => *r,
                        (None, Some(t)) => tokenizers[k].vocab.get(t).ok_or_else(|| {
                            MergeError::Spec(format!(
                                "tokenizer.tokens.{tok}: the token `{t}` is not in `{model}`'s vocabulary"
                            ))
                        })?,
                        (None, None) => {
                            return Err(MergeError::Spec(format!(
                                "tokenizer.tokens.{tok}: a model_token source needs `token` or `token_id`"
                            )))
                        }
                    };
                    let have = embedding_rows(&inputs[k]).unwrap_or(0);
                    if row >= have {
                        return Err(MergeError::Spec(format!(
                            "tokenizer.tokens.{tok}: token id {row} is out of range for `{model}` ({have} rows)"
                        )));
                    }
                    DefaultRow::Row { input: k, row }
                }
                None if present.len() == inputs.len() => DefaultRow::None,
                None if present.len() == 1 => DefaultRow::Row {
                    input: present[0],
                    row: perms[present[0]][*id].expect("present"),
                },
                None if present.is_empty() => DefaultRow::Zero,
                None => match base_input.filter(|b| present.contains(b)) {
                    Some(b) => DefaultRow::Row {
                        input: b,
                        row: perms[b][*id].expect("present"),
                    },
                    None => DefaultRow::Mean(present),
                },
            };
            defaults.push(d);
        }
        plan.json = Some(out.json);
        plan.vocab_len = vocab_len;
        plan.rows = rows;
        plan.perms = perms;
        plan.defaults = defaults;
        plan.force = force;
        Ok(plan)
    }

    /// Whether the embedding rows are rebuilt (the vocabulary changes).
    pub fn permutes(&self) -> bool {
        self.json.is_some()
    }

    /// The output row count of the embedding tensors.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether tensor `name` (of shape `shape` in the reference) has one
    /// row per token and is rebuilt over the output vocabulary.
    pub fn is_embedding(&self, name: &str, shape: &[usize]) -> bool {
        self.permutes() && shape.len() == 2 && is_embedding_name(name)
    }

    /// Rebuilds one embedding tensor of every input over the output
    /// vocabulary (same order as the inputs the plan was built on).
    pub fn permute(&self, name: &str, inputs: &[TensorBuf]) -> Result<Vec<TensorBuf>> {
        let d = inputs[0].shape[1];
        if let Some(bad) = inputs
            .iter()
            .find(|t| t.shape.len() != 2 || t.shape[1] != d)
        {
            return Err(MergeError::Spec(format!(
                "tensor `{name}`: embedding widths differ ({:?} and {:?})",
                inputs[0].shape, bad.shape
            )));
        }
        let data: Vec<Vec<f32>> = inputs.iter().map(TensorBuf::to_f32_vec).collect();
        let row = |k: usize, r: usize| -> Result<&[f32]> {
            data[k].get(r * d..(r + 1) * d).ok_or_else(|| {
                MergeError::Spec(format!(
                    "tensor `{name}`: input {k} has {} rows, the tokenizer names row {r}",
                    data[k].len() / d
                ))
            })
        };
        let mut defaults: Vec<Option<Vec<f32>>> = Vec::with_capacity(self.vocab_len);
        for (id, dflt) in self.defaults.iter().enumerate() {
            defaults.push(match dflt {
                DefaultRow::None => None,
                DefaultRow::Zero => Some(vec![0.0; d]),
                DefaultRow::Row { input, row: r } => Some(row(*input, *r)?.to_vec()),
                DefaultRow::Mean(ks) => {
                    let mut acc = vec![0.0f32; d];
                    for &k in ks {
                        let r = self.perms[k][id].expect("present");
                        for (a, x) in acc.iter_mut().zip(row(k, r)?) {
                            *a += x;
                        }
                    }
                    acc.iter_mut().for_each(|a| *a /= ks.len() as f32);
                    Some(acc)
                }
            });
        }
        let mut out = Vec::with_capacity(inputs.len());
        for k in 0..inputs.len() {
            let mut m = vec![0.0f32; self.rows * d];
            for id in 0..self.vocab_len {
                let dst = &mut m[id * d..(id + 1) * d];
                match (self.perms[k][id], &defaults[id]) {
                    (Some(r), _) if !self.force[id] => dst.copy_from_slice(row(k, r)?),
                    (_, Some(v)) => dst.copy_from_slice(v),
                    (Some(r), None) => dst.copy_from_slice(row(k, r)?),
                    (None, None) => unreachable!("a token an input lacks has a default"),
                }
            }
            if self.rows > self.vocab_len {
                // Padding rows: the mean of the vocabulary's rows.
                let mut mean = vec![0.0f32; d];
                for id in 0..self.vocab_len {
                    for (a, x) in mean.iter_mut().zip(&m[id * d..(id + 1) * d]) {
                        *a += x;
                    }
                }
                mean.iter_mut().for_each(|a| *a /= self.vocab_len as f32);
                for id in self.vocab_len..self.rows {
                    m[id * d..(id + 1) * d].copy_from_slice(&mean);
                }
            }
            out.push(TensorBuf::from_f32(vec![self.rows, d], m));
        }
        Ok(out)
    }

    /// Sets the output config's `vocab_size` (also in `text_config`) to
    /// the row count, when the vocabulary changes.
    pub fn apply_config(&self, config: &mut Value) {
        if !self.permutes() {
            return;
        }
        config["vocab_size"] = json!(self.rows);
        if let Some(text) = config.get_mut("text_config").filter(|t| t.is_object()) {
            text["vocab_size"] = json!(self.rows);
        }
    }

    /// Writes the output's tokenizer files into `writer`'s folder, over
    /// the side files copied from `reference` (config.json: see
    /// [`TokenizerPlan::apply_config`]).
    pub fn write_files(
        &self,
        writer: &runtime::checkpoint::CheckpointWriter,
        reference: &Checkpoint,
    ) -> Result<()> {
        if let Some(json) = &self.json {
            writer.write_file(
                "tokenizer.json",
                &serde_json::to_vec_pretty(json).expect("json"),
            )?;
        }
        if self.json.is_some() || self.chat_template.is_some() {
            let path = reference.dir().join("tokenizer_config.json");
            let mut config: Value = match std::fs::read_to_string(&path) {
                Ok(text) => serde_json::from_str(&text).map_err(|e| MergeError::ModelConfig {
                    path: path.clone(),
                    reason: e.to_string(),
                })?,
                Err(_) => json!({}),
            };
            if let Some(json) = &self.json {
                // transformers reads the added tokens from tokenizer.json;
                // a stale decoder table here would contradict it.
                if let Some(map) = config.as_object_mut() {
                    if map.contains_key("added_tokens_decoder") {
                        let decoder: serde_json::Map<String, Value> = json["added_tokens"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|a| {
                                let mut e = a.clone();
                                let id = e["id"].to_string();
                                if let Some(o) = e.as_object_mut() {
                                    o.remove("id");
                                }
                                (id, e)
                            })
                            .collect();
                        map.insert("added_tokens_decoder".into(), Value::Object(decoder));
                    }
                }
            }
            if let Some(t) = &self.chat_template {
                config["chat_template"] = json!(t);
            }
            writer.write_file(
                "tokenizer_config.json",
                &serde_json::to_vec_pretty(&config).expect("json"),
            )?;
        }
        Ok(())
    }

    /// What the provenance file records.
    pub fn describe(&self) -> Value {
        json!({
            "spec": self.spec,
            "vocab_size": self.permutes().then_some(self.rows),
        })
    }
}

fn not_an_input(model: &str, tok: &str) -> MergeError {
    MergeError::Spec(format!(
        "tokenizer.tokens.{tok}: `{model}` is not one of the merged models"
    ))
}

/// The ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`).
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Llama 3's template (header ids around the role, `<|eot_id|>` after each
/// trimmed message, the BOS token first).
const LLAMA3: &str = "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// The template text of a `chat_template` setting (`None`: `auto` found
/// no model with a template, so nothing is set, as in mergekit).
fn chat_template(setting: &str, inputs: &[Arc<Checkpoint>]) -> Result<Option<String>> {
    match setting {
        "auto" => {
            let mut counts: Vec<(String, usize)> = Vec::new();
            for ck in inputs {
                let path = ck.dir().join("tokenizer_config.json");
                let Ok(text) = std::fs::read_to_string(&path) else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if let Some(t) = v.get("chat_template").and_then(Value::as_str) {
                    let t = t.trim().to_string();
                    match counts.iter_mut().find(|(c, _)| *c == t) {
                        Some((_, n)) => *n += 1,
                        None => counts.push((t, 1)),
                    }
                }
            }
            // The most common; the first seen among equals.
            let best = counts.iter().map(|(_, n)| *n).max();
            Ok(counts.into_iter().find(|(_, n)| Some(*n) == best).map(|(t, _)| t))
        }
        "chatml" => Ok(Some(CHATML.into())),
        "llama3" => Ok(Some(LLAMA3.into())),
        t if t.len() >= 20 && t.contains('{') => Ok(Some(t.to_string())),
        other => Err(MergeError::BadParameter {
            param: "chat_template".into(),
            reason: format!(
                "`{other}` is neither `auto`, a named template (chatml, llama3) nor a Jinja template \
                 (at least 20 characters with a `{{`)"
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use runtime::checkpoint::{CheckpointWriter, WriteOptions};

    const EMBED: &str = "model.embed_tokens.weight";

    /// A folder with a WordLevel tokenizer (`vocab` by id, `added` after
    /// it), an embedding of rows `[v, v]` and `vocab_size` = its rows.
    fn model(
        dir: &Path,
        name: &str,
        vocab: &[&str],
        added: &[(&str, bool)],
        rows: &[f32],
    ) -> Arc<Checkpoint> {
        let out = dir.join(name);
        let n = rows.len();
        let layout = vec![(EMBED.to_string(), DType::F32, vec![n, 2])];
        let w = CheckpointWriter::create(&out, &layout, &WriteOptions::default()).unwrap();
        let data: Vec<f32> = rows.iter().flat_map(|&v| [v, v]).collect();
        w.write_f32(EMBED, &data).unwrap();
        let map: serde_json::Map<String, Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), json!(i)))
            .collect();
        let added: Vec<Value> = added
            .iter()
            .enumerate()
            .map(|(i, (t, special))| {
                json!({"id": vocab.len() + i, "content": t, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": special})
            })
            .collect();
        let tok = json!({"version": "1.0", "added_tokens": added,
            "model": {"type": "WordLevel", "vocab": map, "unk_token": "a"}});
        w.write_file("tokenizer.json", tok.to_string().as_bytes())
            .unwrap();
        w.write_file(
            "config.json",
            json!({"model_type": "llama", "vocab_size": n})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        w.finish().unwrap();
        Checkpoint::open(name, &out).unwrap()
    }

    /// base: a b c; x: a c d + added <x>; y: a b d.
    fn pool(dir: &Path) -> Vec<Arc<Checkpoint>> {
        vec![
            model(dir, "base", &["a", "b", "c"], &[], &[1., 2., 3.]),
            model(
                dir,
                "x",
                &["a", "c", "d"],
                &[("<x>", true)],
                &[10., 30., 40., 50.],
            ),
            model(dir, "y", &["a", "b", "d"], &[], &[100., 200., 400.]),
        ]
    }

    fn union(tokens: BTreeMap<String, TokenRow>, pad: Option<usize>) -> TokenizerSpec {
        TokenizerSpec {
            source: Source::Union,
            tokens,
            pad_to_multiple_of: pad,
            chat_template: None,
            base_model: Some("base".into()),
        }
    }

    fn rows_of(plan: &TokenizerPlan, inputs: &[Arc<Checkpoint>]) -> Vec<Vec<f32>> {
        let bufs: Vec<TensorBuf> = inputs.iter().map(|c| c.tensor(EMBED).unwrap()).collect();
        plan.permute(EMBED, &bufs)
            .unwrap()
            .iter()
            .map(|t| t.to_f32_vec().chunks(2).map(|r| r[0]).collect())
            .collect()
    }

    fn no_open(name: &str) -> Result<Arc<Checkpoint>> {
        Err(MergeError::Spec(format!("opened {name}")))
    }

    #[test]
    fn union_vocabulary_and_default_rows_follow_mergekit() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = pool(dir.path());
        let plan = TokenizerPlan::new(
            &union(BTreeMap::new(), None),
            &inputs,
            &inputs,
            true,
            &no_open,
        )
        .unwrap();
        // Output: a b c (the base's), d (first met in x, a new id), <x>
        // (x's added token, its settings kept).
        let json = plan.json.as_ref().unwrap();
        let added = json["added_tokens"].as_array().unwrap();
        assert_eq!(added.len(), 2);
        assert_eq!(
            (added[0]["content"].as_str(), added[0]["id"].as_u64()),
            (Some("d"), Some(3))
        );
        assert_eq!(added[0]["special"], json!(false));
        assert_eq!(
            (added[1]["content"].as_str(), added[1]["id"].as_u64()),
            (Some("<x>"), Some(4))
        );
        assert_eq!(added[1]["special"], json!(true));
        assert_eq!(plan.rows(), 5);
        // Defaults: b and c from the base (present in it), d the mean of x's
        // and y's rows (40 + 400) / 2 = 220, <x> x's own row (only x has it).
        assert_eq!(
            rows_of(&plan, &inputs),
            vec![
                vec![1., 2., 3., 220., 50.],
                vec![10., 2., 30., 40., 50.],
                vec![100., 200., 3., 400., 50.],
            ]
        );
        let mut config = json!({"vocab_size": 3, "text_config": {"vocab_size": 3}});
        plan.apply_config(&mut config);
        assert_eq!(
            config,
            json!({"vocab_size": 5, "text_config": {"vocab_size": 5}})
        );
    }

    #[test]
    fn token_settings_force_rows_and_padding_takes_the_mean() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = pool(dir.path());
        let mut tokens = BTreeMap::new();
        // `a` forced to zeros everywhere; `c` from y's row of `b` (200);
        // a new token `<new>` from x's row of `<x>` (50).
        tokens.insert(
            "a".to_string(),
            TokenRow {
                source: Some(RowSource::Zero),
                force: true,
            },
        );
        tokens.insert(
            "c".to_string(),
            TokenRow {
                source: Some(RowSource::ModelToken {
                    model: "y".into(),
                    token_id: None,
                    token: Some("b".into()),
                }),
                force: false,
            },
        );
        tokens.insert(
            "<new>".to_string(),
            TokenRow {
                source: Some(RowSource::ModelToken {
                    model: "x".into(),
                    token_id: Some(3),
                    token: None,
                }),
                force: false,
            },
        );
        let plan =
            TokenizerPlan::new(&union(tokens, Some(4)), &inputs, &inputs, true, &no_open).unwrap();
        // Vocabulary a b c d <x> <new> (6), padded to 8.
        assert_eq!(plan.rows(), 8);
        let rows = rows_of(&plan, &inputs);
        // base: 0 (forced), 2, 3 (its own c), 220, 50, 50; padding = mean of
        // the six = (0+2+3+220+50+50)/6 = 54.1667.
        let m = (2. + 3. + 220. + 50. + 50.) / 6.;
        assert_eq!(rows[0][..6], [0., 2., 3., 220., 50., 50.]);
        assert!((rows[0][6] - m).abs() < 1e-4 && (rows[0][7] - m).abs() < 1e-4);
        // y lacks c: takes the configured source, y's row of `b` = 200.
        assert_eq!(rows[2][..6], [0., 200., 200., 400., 50., 50.]);
    }

    #[test]
    fn a_model_source_keeps_its_tokenizer_and_bad_sources_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = pool(dir.path());
        let spec = TokenizerSpec {
            source: Source::Model("y".into()),
            ..union(BTreeMap::new(), None)
        };
        let plan = TokenizerPlan::new(&spec, &inputs, &inputs, true, &no_open).unwrap();
        // y's vocabulary a b d: c is dropped, d the mean of x and y.
        assert_eq!(plan.rows(), 3);
        assert_eq!(rows_of(&plan, &inputs)[0], vec![1., 2., 220.]);
        let mut tokens = BTreeMap::new();
        tokens.insert(
            "zz".to_string(),
            TokenRow {
                source: Some(RowSource::Model("x".into())),
                force: false,
            },
        );
        let e = TokenizerPlan::new(&union(tokens, None), &inputs, &inputs, true, &no_open)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("`x` does not have the token `zz`"), "{e}");
        let bad = TokenizerSpec {
            chat_template: Some("{x}".into()),
            ..TokenizerSpec::default()
        };
        let e = TokenizerPlan::new(&bad, &inputs, &inputs, true, &no_open)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("chat_template"), "{e}");
    }

    #[test]
    fn stripping_drops_tokens_past_the_vocabulary() {
        let mut json = json!({
            "added_tokens": [{"id": 3, "content": "<pad>"}],
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "zz": 3}, "merges": ["a b", "z z", "ab b"]}
        });
        strip(&mut json, 3);
        assert_eq!(json["added_tokens"], json!([]));
        assert_eq!(json["model"]["vocab"], json!({"a": 0, "b": 1, "ab": 2}));
        // A merge goes with a token it joins, not with its result.
        assert_eq!(json["model"]["merges"], json!(["a b", "z z", "ab b"]));
        strip(&mut json, 2);
        assert_eq!(json["model"]["merges"], json!(["a b", "z z"]));
    }
}
