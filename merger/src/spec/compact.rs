//! The compact merge spec of the OpenAI `model` field.
//!
//! ```text
//! model_field := [pool "/"] method "(" models [";" params] ")"
//!              | [pool "/"] name                   (a preset or a checkpoint)
//!              | "merge-" hex{16,}                 (a merge made by POST /v1/merges)
//! models      := model ("," model)*
//! model       := ident [":" weight] ["{" params "}"]
//! params      := param ("," param)*
//! param       := ident "=" value
//! weight      := number | gradient | filters
//! value       := number | "true" | "false" | word | gradient | names | filters
//! gradient    := "[" number ("," number)* "]"
//! names       := "[" name ("," name)* "]"    (first item not a number)
//! name        := [A-Za-z0-9_.*-]+
//! filters     := "{" entry ("," entry)* "}"
//! entry       := [ident ":"] (number | gradient)
//! ident       := [A-Za-z0-9_.-]+
//! ```
//!
//! Examples: `ties_merging(math,code;density=0.2,scaling_coefficient=0.3)`,
//! `task_arithmetic(math:0.5,code:1.0;base=llama,scaling_coefficient=0.3)`,
//! `demo/simple_average(a,b)`, `dare_ties(a{density=0.3},b;seed=7)`,
//! `slerp(a,b;t={self_attn:[0,0.5,1],mlp:0.3,0.5})`,
//! `iso_c(a,b;base=llama,exclude_keys=[model.embed_tokens.weight])`.
//!
//! Three keys of the parameter list fill spec fields instead of parameters:
//! `base=NAME`, `seed=N` (a non-negative integer) and `dtype=` one of
//! `float32`, `float16`, `bfloat16` (or `fp32`, `fp16`, `bf16`). A spec
//! without `base` keeps `base: None`; the pool fills in its own base.
//! Whitespace is allowed around every token. The produced spec is in the
//! FusionBench dialect; method names are not checked here (building the
//! method does that). Errors carry the character offset of the offending
//! token. The length limit of a spec is enforced by the gateway.

use std::collections::BTreeMap;

use crate::error::{MergeError, Result};
use crate::spec::{Dialect, FilterEntry, Form, MergeSpec, ModelSpec, ParamValue, Residency};

/// What a `model` field names.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// An inline merge.
    Merge(Box<MergeSpec>),
    /// A merge created earlier, as written: `merge-` and its hex id
    /// (lower-cased, so that it compares equal to `merge-` + [`super::canonical::merge_id`]).
    MergeId(String),
    /// A preset or a plain checkpoint name, possibly `pool/name`, as written.
    Name(String),
}

/// Minimum number of hex digits after `merge-` for a merge id.
const MIN_ID_HEX: usize = 16;

/// Parses a `model` field.
pub fn parse(input: &str) -> Result<Parsed> {
    Parser::new(input).model_field()
}

/// The canonical spelling of an output dtype (`bf16` → `bfloat16`, ...).
pub fn dtype_name(s: &str) -> Option<&'static str> {
    match s.strip_prefix("torch.").unwrap_or(s) {
        "float32" | "fp32" | "f32" => Some("float32"),
        "float16" | "fp16" | "f16" => Some("float16"),
        "bfloat16" | "bf16" => Some("bfloat16"),
        _ => None,
    }
}

/// Writes `spec` in the compact form.
///
/// `parse(&to_compact(s))` gives back `s` for every spec in the FusionBench
/// dialect whose checkpoint names, parameter keys, filters and word values
/// are identifiers (`[A-Za-z0-9_.-]+`, and words not spelling a number or a
/// boolean), whose lists of names hold names of `[A-Za-z0-9_.*-]+` that do
/// not spell a number, whose gradients and lists are not empty and which
/// has no parameter named
/// `base`, `seed`, `dtype` or `form*`. The compact form always means the FusionBench
/// dialect, so a mergekit spec written this way takes FusionBench defaults.
pub fn to_compact(spec: &MergeSpec) -> String {
    let mut out = String::new();
    if let Some(pool) = &spec.pool {
        out.push_str(pool);
        out.push('/');
    }
    out.push_str(&spec.method);
    out.push('(');
    let models: Vec<String> = spec.models.iter().map(model_to_compact).collect();
    out.push_str(&models.join(","));
    let mut params: Vec<String> = Vec::new();
    if let Some(base) = &spec.base {
        params.push(format!("base={base}"));
    }
    params.extend(
        spec.parameters
            .iter()
            .map(|(k, v)| format!("{k}={}", value_to_compact(v))),
    );
    if let Some(seed) = spec.seed {
        params.push(format!("seed={seed}"));
    }
    if let Some(dtype) = &spec.dtype {
        params.push(format!("dtype={dtype}"));
    }
    if let Some(r) = &spec.residency {
        params.push(format!("form={}", r.form.as_str()));
        if let Some(v) = r.vectors {
            params.push(format!("form_vectors={}", v.as_str()));
        }
        if let Some(e) = r.energy {
            params.push(format!("form_energy={e}"));
        }
        if let Some(k) = r.rank {
            params.push(format!("form_rank={k}"));
        }
        if let Some(d) = r.density {
            params.push(format!("form_density={d}"));
        }
    }
    if !params.is_empty() {
        out.push(';');
        out.push_str(&params.join(","));
    }
    out.push(')');
    out
}

fn model_to_compact(m: &ModelSpec) -> String {
    let mut s = m.name.clone();
    if let Some(w) = &m.weight {
        s.push(':');
        s.push_str(&value_to_compact(w));
    }
    if !m.parameters.is_empty() {
        let params: Vec<String> = m
            .parameters
            .iter()
            .map(|(k, v)| format!("{k}={}", value_to_compact(v)))
            .collect();
        s.push('{');
        s.push_str(&params.join(","));
        s.push('}');
    }
    s
}

pub(crate) fn value_to_compact(v: &ParamValue) -> String {
    // `{}` on f64 writes the shortest decimal that reads back to the same
    // number, without an exponent, so numbers survive the round trip.
    match v {
        ParamValue::Bool(b) => b.to_string(),
        ParamValue::Number(x) => x.to_string(),
        ParamValue::Text(s) => s.clone(),
        ParamValue::Gradient(g) => {
            let items: Vec<String> = g.iter().map(f64::to_string).collect();
            format!("[{}]", items.join(","))
        }
        ParamValue::Names(names) => format!("[{}]", names.join(",")),
        ParamValue::Filtered(entries) => {
            let items: Vec<String> = entries
                .iter()
                .map(|e| match &e.filter {
                    Some(f) => format!("{f}:{}", value_to_compact(&e.value)),
                    None => value_to_compact(&e.value),
                })
                .collect();
            format!("{{{}}}", items.join(","))
        }
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// Characters of a bare value word: identifiers plus `+` for `1e+3`.
fn is_word_char(c: char) -> bool {
    is_ident_char(c) || c == '+'
}

/// Characters of a name in a list: identifiers plus `*` for patterns.
fn is_name_char(c: char) -> bool {
    is_ident_char(c) || c == '*'
}

/// A recursive-descent parser over the characters of the input; positions
/// are character offsets.
struct Parser<'a> {
    input: &'a str,
    chars: Vec<char>,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            chars: input.chars().collect(),
            pos: 0,
        }
    }

    fn error_at(&self, position: usize, reason: impl Into<String>) -> MergeError {
        MergeError::Parse {
            input: self.input.to_string(),
            position,
            reason: reason.into(),
        }
    }

    fn skip_ws(&mut self) {
        while self.chars.get(self.pos).is_some_and(|c| c.is_whitespace()) {
            self.pos += 1;
        }
    }

    /// The next non-space character, without consuming it.
    fn peek(&mut self) -> Option<char> {
        self.skip_ws();
        self.chars.get(self.pos).copied()
    }

    /// Consumes `c` if it is the next non-space character.
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// A run of characters accepted by `ok`, with its start offset.
    fn take_while(&mut self, ok: fn(char) -> bool) -> (usize, String) {
        self.skip_ws();
        let start = self.pos;
        while self.chars.get(self.pos).is_some_and(|c| ok(*c)) {
            self.pos += 1;
        }
        (start, self.chars[start..self.pos].iter().collect())
    }

    /// An identifier; `what` names it in the error when there is none.
    fn ident(&mut self, what: &str) -> Result<(usize, String)> {
        let (start, s) = self.take_while(is_ident_char);
        if s.is_empty() {
            return Err(self.unexpected(start, &format!("expected {what}")));
        }
        Ok((start, s))
    }

    /// A checkpoint name: an identifier that may also contain `/` (a
    /// pool-qualified name, or a folder path for `fusion merge --spec`; the
    /// gateway accepts registered names only).
    fn checkpoint(&mut self, what: &str) -> Result<(usize, String)> {
        let (start, s) = self.take_while(|c| is_ident_char(c) || c == '/');
        if s.is_empty() {
            return Err(self.unexpected(start, &format!("expected {what}")));
        }
        Ok((start, s))
    }

    /// An error at `pos` that also says what was found there.
    fn unexpected(&self, pos: usize, expected: &str) -> MergeError {
        match self.chars.get(pos) {
            Some(c) => self.error_at(pos, format!("{expected}, found `{c}`")),
            None => self.error_at(pos, format!("{expected}, found the end of the input")),
        }
    }

    fn model_field(&mut self) -> Result<Parsed> {
        let (_, first) = self.ident("a method or model name")?;
        let (pool, name) = if self.eat('/') {
            let (_, name) = self.ident("a method or model name after `pool/`")?;
            (Some(first), name)
        } else {
            (None, first)
        };
        match self.peek() {
            None => Ok(match pool {
                None if is_merge_id(&name) => Parsed::MergeId(name.to_ascii_lowercase()),
                None => Parsed::Name(name),
                Some(pool) => Parsed::Name(format!("{pool}/{name}")),
            }),
            Some('(') => {
                self.pos += 1;
                let spec = self.merge(pool, name)?;
                if self.peek().is_some() {
                    return Err(self.error_at(self.pos, "trailing characters"));
                }
                Ok(Parsed::Merge(Box::new(spec)))
            }
            Some(_) => Err(self.unexpected(self.pos, "expected `(` or the end of the input")),
        }
    }

    /// Everything after `method(`, up to and including the closing `)`.
    fn merge(&mut self, pool: Option<String>, method: String) -> Result<MergeSpec> {
        let mut spec = MergeSpec {
            method,
            pool,
            base: None,
            models: Vec::new(),
            parameters: BTreeMap::new(),
            seed: None,
            dtype: None,
            dialect: Dialect::Fusionbench,
            residency: None,
            task: None,
        };
        if matches!(self.peek(), Some(')' | ';')) {
            return Err(self.error_at(self.pos, "empty model list"));
        }
        loop {
            spec.models.push(self.model()?);
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(')') => {
                    self.pos += 1;
                    return Ok(spec);
                }
                Some(';') => {
                    self.pos += 1;
                    break;
                }
                None => return Err(self.error_at(self.pos, "expected `)`")),
                Some(_) => return Err(self.unexpected(self.pos, "expected `,`, `;` or `)`")),
            }
        }
        let mut seen: Vec<String> = Vec::new();
        loop {
            let (key_pos, key) = self.ident("a parameter name")?;
            if seen.contains(&key) {
                return Err(self.error_at(key_pos, format!("duplicate parameter `{key}`")));
            }
            seen.push(key.clone());
            if !self.eat('=') {
                return Err(self.unexpected(self.pos, &format!("expected `=` after `{key}`")));
            }
            match key.as_str() {
                "base" => spec.base = Some(self.checkpoint("a checkpoint name after `base=`")?.1),
                "seed" => spec.seed = Some(self.seed()?),
                "dtype" => spec.dtype = Some(self.dtype()?),
                "form" | "form_vectors" | "form_energy" | "form_rank" | "form_density" => {
                    self.residency(&key, spec.residency.get_or_insert_with(Residency::dense))?
                }
                _ => {
                    let value = self.value()?;
                    spec.parameters.insert(key, value);
                }
            }
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(')') => {
                    self.pos += 1;
                    return Ok(spec);
                }
                None => return Err(self.error_at(self.pos, "expected `)`")),
                Some(_) => return Err(self.unexpected(self.pos, "expected `,` or `)`")),
            }
        }
    }

    /// `name[:weight][{key=value,...}]`.
    fn model(&mut self) -> Result<ModelSpec> {
        let (_, name) = self.checkpoint("a model name")?;
        let mut model = ModelSpec::named(name);
        if self.eat(':') {
            model.weight = Some(self.numeric_value("expected a number after `:`")?);
        }
        if self.eat('{') {
            loop {
                let (key_pos, key) = self.ident("a parameter name")?;
                let duplicate = model.parameters.contains_key(&key)
                    || (key == "weight" && model.weight.is_some());
                if duplicate {
                    return Err(self.error_at(key_pos, format!("duplicate parameter `{key}`")));
                }
                if !self.eat('=') {
                    return Err(self.unexpected(self.pos, &format!("expected `=` after `{key}`")));
                }
                let value = self.value()?;
                if key == "weight" {
                    model.weight = Some(value);
                } else {
                    model.parameters.insert(key, value);
                }
                match self.peek() {
                    Some(',') => self.pos += 1,
                    Some('}') => {
                        self.pos += 1;
                        break;
                    }
                    None => return Err(self.error_at(self.pos, "expected `}`")),
                    Some(_) => return Err(self.unexpected(self.pos, "expected `,` or `}`")),
                }
            }
        }
        Ok(model)
    }

    /// A number, a gradient or a filter list; `expected` is the error.
    fn numeric_value(&mut self, expected: &str) -> Result<ParamValue> {
        match self.peek() {
            Some('[') => self.gradient(),
            Some('{') => self.filters(),
            _ => self.number_token(expected),
        }
    }

    /// Any parameter value.
    fn value(&mut self) -> Result<ParamValue> {
        match self.peek() {
            Some('[') => self.list(),
            Some('{') => self.filters(),
            _ => {
                let (start, word) = self.take_while(is_word_char);
                let first = word.chars().next();
                match word.as_str() {
                    "" => Err(self.unexpected(start, "expected a value")),
                    "true" => Ok(ParamValue::Bool(true)),
                    "false" => Ok(ParamValue::Bool(false)),
                    _ if first
                        .is_some_and(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.')) =>
                    {
                        parse_number(&word)
                            .map(ParamValue::Number)
                            .ok_or_else(|| self.error_at(start, format!("invalid number `{word}`")))
                    }
                    _ if word.contains('+') => {
                        Err(self.error_at(start, format!("invalid value `{word}`")))
                    }
                    _ => Ok(ParamValue::Text(word)),
                }
            }
        }
    }

    /// `[...]` as a parameter value, the `[` not yet consumed: a gradient
    /// when the first item is a number (or missing: the gradient's error
    /// says so), else a list of names.
    fn list(&mut self) -> Result<ParamValue> {
        let open = self.pos;
        self.eat('[');
        let (_, first) = self.take_while(|c| is_word_char(c) || c == '*');
        self.pos = open;
        if first.is_empty() || parse_number(&first).is_some() {
            self.gradient()
        } else {
            self.names()
        }
    }

    /// `[name, ...]`, the `[` not yet consumed.
    fn names(&mut self) -> Result<ParamValue> {
        self.eat('[');
        let mut names = Vec::new();
        loop {
            let (start, word) = self.take_while(is_name_char);
            if word.is_empty() {
                return Err(self.unexpected(start, "expected a name in the list"));
            }
            if parse_number(&word).is_some() {
                return Err(self.error_at(
                    start,
                    format!("expected a name in the list, found the number `{word}` (a list holds only numbers or only names)"),
                ));
            }
            names.push(word);
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(']') => {
                    self.pos += 1;
                    return Ok(ParamValue::Names(names));
                }
                None => return Err(self.error_at(self.pos, "expected `]`")),
                Some(_) => return Err(self.unexpected(self.pos, "expected `,` or `]`")),
            }
        }
    }

    /// `[x, y, ...]`, the `[` not yet consumed.
    fn gradient(&mut self) -> Result<ParamValue> {
        let open = self.pos;
        self.eat('[');
        if self.peek() == Some(']') {
            return Err(self.error_at(open, "empty gradient list"));
        }
        let mut values = Vec::new();
        loop {
            let (start, word) = self.take_while(is_word_char);
            match parse_number(&word) {
                Some(x) => values.push(x),
                None if word.is_empty() => {
                    return Err(self.unexpected(start, "expected a number in the gradient list"))
                }
                None => {
                    return Err(self.error_at(
                        start,
                        format!("expected a number in the gradient list, found `{word}`"),
                    ))
                }
            }
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(']') => {
                    self.pos += 1;
                    return Ok(ParamValue::Gradient(values));
                }
                None => return Err(self.error_at(self.pos, "expected `]`")),
                Some(_) => return Err(self.unexpected(self.pos, "expected `,` or `]`")),
            }
        }
    }

    /// `{filter:value, ..., value}`, the `{` not yet consumed.
    fn filters(&mut self) -> Result<ParamValue> {
        let open = self.pos;
        self.eat('{');
        if self.peek() == Some('}') {
            return Err(self.error_at(open, "empty filter list"));
        }
        let mut entries = Vec::new();
        loop {
            let entry = if self.peek() == Some('[') {
                FilterEntry {
                    filter: None,
                    value: self.gradient()?,
                }
            } else {
                let (start, word) = self.take_while(is_word_char);
                if self.eat(':') {
                    if word.is_empty() || !word.chars().all(is_ident_char) {
                        return Err(self.error_at(start, "expected a filter name before `:`"));
                    }
                    let value = match self.peek() {
                        Some('[') => self.gradient()?,
                        _ => self.number_token("expected a number or a gradient list after `:`")?,
                    };
                    FilterEntry {
                        filter: Some(word),
                        value,
                    }
                } else {
                    match parse_number(&word) {
                        Some(x) => FilterEntry {
                            filter: None,
                            value: ParamValue::Number(x),
                        },
                        None if word.is_empty() => {
                            return Err(self
                                .unexpected(start, "expected `filter:value` or a default value"))
                        }
                        None => {
                            return Err(self.unexpected(
                                self.pos,
                                &format!("expected `:` after filter `{word}`"),
                            ))
                        }
                    }
                }
            };
            entries.push(entry);
            match self.peek() {
                Some(',') => self.pos += 1,
                Some('}') => {
                    self.pos += 1;
                    return Ok(ParamValue::Filtered(entries));
                }
                None => return Err(self.error_at(self.pos, "expected `}`")),
                Some(_) => return Err(self.unexpected(self.pos, "expected `,` or `}`")),
            }
        }
    }

    fn number_token(&mut self, expected: &str) -> Result<ParamValue> {
        let (start, word) = self.take_while(is_word_char);
        match parse_number(&word) {
            Some(x) => Ok(ParamValue::Number(x)),
            None if word.is_empty() => Err(self.unexpected(start, expected)),
            None => Err(self.error_at(start, format!("{expected}, found `{word}`"))),
        }
    }

    /// The value of a residency key (`form=lowrank`, `form_energy=0.9`,
    /// `form_rank=16`, `form_density=0.1`, `form_vectors=sparse`); ranges
    /// are checked when the spec is validated.
    fn residency(&mut self, key: &str, r: &mut Residency) -> Result<()> {
        let (start, word) = self.take_while(is_word_char);
        let number = || {
            parse_number(&word).ok_or_else(|| {
                self.error_at(start, format!("`{key}` must be a number, found `{word}`"))
            })
        };
        let form = || {
            Form::parse(&word).ok_or_else(|| {
                self.error_at(
                    start,
                    format!(
                        "unknown form `{word}` (expected dense, lowrank, sparse or combination)"
                    ),
                )
            })
        };
        match key {
            "form" => r.form = form()?,
            "form_vectors" => r.vectors = Some(form()?),
            "form_energy" => r.energy = Some(number()?),
            "form_density" => r.density = Some(number()?),
            _ => {
                r.rank = Some(word.parse::<u64>().map_err(|_| {
                    self.error_at(
                        start,
                        format!("`form_rank` must be a positive integer, found `{word}`"),
                    )
                })?)
            }
        }
        Ok(())
    }

    fn seed(&mut self) -> Result<u64> {
        let (start, word) = self.take_while(is_word_char);
        word.parse::<u64>().map_err(|_| {
            self.error_at(
                start,
                format!("`seed` must be a non-negative integer, found `{word}`"),
            )
        })
    }

    fn dtype(&mut self) -> Result<String> {
        let (start, word) = self.take_while(is_word_char);
        dtype_name(&word).map(str::to_string).ok_or_else(|| {
            self.error_at(
                start,
                format!("unknown dtype `{word}` (expected float32, float16 or bfloat16; or fp32, fp16, bf16)"),
            )
        })
    }
}

/// A decimal number (`0.3`, `-1`, `1e-3`, `.5`); `None` for anything else,
/// including `inf` and `NaN`, which Rust's parser would accept.
fn parse_number(word: &str) -> Option<f64> {
    let first = word.chars().next()?;
    if !(first.is_ascii_digit() || matches!(first, '-' | '+' | '.')) {
        return None;
    }
    word.parse::<f64>().ok().filter(|x| x.is_finite())
}

fn is_merge_id(name: &str) -> bool {
    name.strip_prefix("merge-")
        .is_some_and(|hex| hex.len() >= MIN_ID_HEX && hex.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merge(input: &str) -> MergeSpec {
        match parse(input) {
            Ok(Parsed::Merge(spec)) => *spec,
            other => panic!("`{input}` parsed to {other:?}"),
        }
    }

    /// The (position, reason) of a parse error.
    fn parse_err(input: &str) -> (usize, String) {
        match parse(input) {
            Err(MergeError::Parse {
                input: i,
                position,
                reason,
            }) => {
                assert_eq!(i, input);
                (position, reason)
            }
            other => panic!("`{input}` gave {other:?}, expected a parse error"),
        }
    }

    #[test]
    fn parses_ties_with_parameters() {
        let spec = merge("ties_merging(math,code;density=0.2,scaling_coefficient=0.3)");
        let expected = MergeSpec::new("ties_merging", None, &["math", "code"])
            .with("density", 0.2)
            .with("scaling_coefficient", 0.3);
        assert_eq!(spec, expected);
        assert_eq!(spec.dialect, Dialect::Fusionbench);
        assert_eq!(spec.base, None);
    }

    #[test]
    fn parses_weights_base_seed_dtype_and_pool() {
        let spec = merge(" demo / task_arithmetic( math:0.5 , code : 1.0 ; base = llama-3.1 , scaling_coefficient=0.3, seed=7, dtype=bf16 ) ");
        assert_eq!(spec.pool.as_deref(), Some("demo"));
        assert_eq!(spec.method, "task_arithmetic");
        assert_eq!(spec.base.as_deref(), Some("llama-3.1"));
        assert_eq!(spec.seed, Some(7));
        assert_eq!(spec.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(spec.models[0].weight, Some(ParamValue::Number(0.5)));
        assert_eq!(spec.models[1].weight, Some(ParamValue::Number(1.0)));
        // base, seed and dtype are fields, not parameters.
        assert_eq!(
            spec.parameters.keys().collect::<Vec<_>>(),
            vec!["scaling_coefficient"]
        );
    }

    #[test]
    fn parses_every_kind_of_value() {
        let spec = merge("m(a;x=1e-3,y=-2,z=true,w=false,f=mean,g=[0, 0.5 ,1],p=1e+3,q=.5,n=[ model.embed_tokens.weight ,*mlp*],h=[1e+3])");
        let p = &spec.parameters;
        assert_eq!(p["x"], ParamValue::Number(0.001));
        assert_eq!(p["y"], ParamValue::Number(-2.0));
        assert_eq!(p["z"], ParamValue::Bool(true));
        assert_eq!(p["w"], ParamValue::Bool(false));
        assert_eq!(p["f"], ParamValue::Text("mean".into()));
        assert_eq!(p["g"], ParamValue::Gradient(vec![0.0, 0.5, 1.0]));
        assert_eq!(p["p"], ParamValue::Number(1000.0));
        assert_eq!(p["q"], ParamValue::Number(0.5));
        assert_eq!(
            p["n"],
            ParamValue::Names(vec!["model.embed_tokens.weight".into(), "*mlp*".into()])
        );
        assert_eq!(p["h"], ParamValue::Gradient(vec![1000.0]));
    }

    #[test]
    fn parses_filters_and_per_model_parameters() {
        let spec = merge("slerp(a,b;t={self_attn:[0,0.5,1], mlp:0.3, 0.5})");
        let expected = ParamValue::Filtered(vec![
            FilterEntry {
                filter: Some("self_attn".into()),
                value: ParamValue::Gradient(vec![0.0, 0.5, 1.0]),
            },
            FilterEntry {
                filter: Some("mlp".into()),
                value: ParamValue::Number(0.3),
            },
            FilterEntry {
                filter: None,
                value: ParamValue::Number(0.5),
            },
        ]);
        assert_eq!(spec.parameters["t"], expected);
        let spec = merge("dare_ties(a:0.6{density=0.3},b{weight=[0,1],density=0.5})");
        assert_eq!(spec.models[0].weight, Some(ParamValue::Number(0.6)));
        assert_eq!(
            spec.models[0].parameters["density"],
            ParamValue::Number(0.3)
        );
        assert_eq!(
            spec.models[1].weight,
            Some(ParamValue::Gradient(vec![0.0, 1.0]))
        );
        assert_eq!(
            spec.models[1].parameters["density"],
            ParamValue::Number(0.5)
        );
    }

    #[test]
    fn names_and_merge_ids() {
        assert_eq!(
            parse("llama-3.1-8b").unwrap(),
            Parsed::Name("llama-3.1-8b".into())
        );
        assert_eq!(
            parse("demo/math").unwrap(),
            Parsed::Name("demo/math".into())
        );
        assert_eq!(
            parse("merge-0123456789ABCDEF").unwrap(),
            Parsed::MergeId("merge-0123456789abcdef".into())
        );
        // Fewer than 16 hex digits, or a non-hex digit: a plain name.
        assert_eq!(
            parse("merge-0123456789abcde").unwrap(),
            Parsed::Name("merge-0123456789abcde".into())
        );
        assert_eq!(
            parse("merge-0123456789abcdeg").unwrap(),
            Parsed::Name("merge-0123456789abcdeg".into())
        );
    }

    #[test]
    fn checkpoint_names_may_be_paths() {
        let Parsed::Merge(spec) =
            parse("task_arithmetic(pool/expert_1, ../x/y;base=pool/base)").unwrap()
        else {
            panic!("a merge")
        };
        assert_eq!(spec.models[0].name, "pool/expert_1");
        assert_eq!(spec.models[1].name, "../x/y");
        assert_eq!(spec.base.as_deref(), Some("pool/base"));
    }

    #[test]
    fn error_positions() {
        // Positions are character offsets of the offending token.
        let cases: &[(&str, usize, &str)] = &[
            ("ties_merging(math,code", 22, "expected `)`"),
            ("ties_merging(math code)", 18, "expected `,`, `;` or `)`"),
            (
                "ties_merging(math,code;density=0.2,density=0.3)",
                35,
                "duplicate parameter `density`",
            ),
            ("ties_merging()", 13, "empty model list"),
            ("ties_merging( ;density=0.2)", 14, "empty model list"),
            (
                "task_arithmetic(math:x,code)",
                21,
                "expected a number after `:`",
            ),
            (
                "task_arithmetic(math:,code)",
                21,
                "expected a number after `:`",
            ),
            ("simple_average(a,b) x", 20, "trailing characters"),
            ("simple_average(a,b))", 19, "trailing characters"),
            ("simple_average(a,,b)", 17, "expected a model name"),
            ("m(a;x)", 5, "expected `=` after `x`"),
            ("m(a;x=)", 6, "expected a value"),
            ("m(a;x=1.2.3)", 6, "invalid number `1.2.3`"),
            ("m(a;x=[])", 6, "empty gradient list"),
            ("m(a;x=[0,a])", 9, "expected a number in the gradient list"),
            ("m(a;x=[0,1)", 10, "expected `,` or `]`"),
            (
                "m(a;x=[a,0])",
                9,
                "expected a name in the list, found the number `0`",
            ),
            ("m(a;x=[a,])", 9, "expected a name in the list"),
            ("m(a;x=[a b])", 9, "expected `,` or `]`"),
            ("m(a;x=[a", 8, "expected `]`"),
            ("m(a;seed=-1)", 9, "`seed` must be a non-negative integer"),
            ("m(a;dtype=int8)", 10, "unknown dtype `int8`"),
            ("m(a;x=1 y=2)", 8, "expected `,` or `)`"),
            ("m(a$b)", 3, "expected `,`, `;` or `)`"),
            ("a b", 2, "expected `(` or the end of the input"),
            ("", 0, "expected a method or model name"),
            ("é(a)", 0, "expected a method or model name"),
            // Non-ASCII input: the offset counts characters, not bytes.
            ("m(é)", 2, "expected a model name"),
            (
                "m(a{density=0.2,density=0.3})",
                16,
                "duplicate parameter `density`",
            ),
            ("m(a:0.5{weight=1})", 8, "duplicate parameter `weight`"),
        ];
        for (input, position, reason) in cases {
            let (p, r) = parse_err(input);
            assert_eq!(p, *position, "position for `{input}` ({r})");
            assert!(
                r.starts_with(reason),
                "reason for `{input}`: `{r}` should start with `{reason}`"
            );
        }
    }

    #[test]
    fn error_message_points_at_the_token() {
        let err = parse("ties_merging(math,code;density=0.2,density=0.3)").unwrap_err();
        let text = err.to_string();
        // The caret sits under the second `density` (offset 35).
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[2].find('^'), Some(2 + 35), "{text}");
    }

    #[test]
    fn round_trips_through_the_compact_form() {
        let mut dare = MergeSpec::new("dare", Some("llama"), &["math", "code", "chat-v1.5"])
            .with("sparsity_ratio", 0.7)
            .with("scaling_coefficient", 0.30000000000000004)
            .with("tiny", 1e-12)
            .with("huge", -1.5e20)
            .with_value("rescale", ParamValue::Bool(false))
            .with_value("combine", ParamValue::Text("ties".into()));
        dare.seed = Some(u64::MAX);
        dare.dtype = Some("float16".into());
        dare.pool = Some("demo".into());
        dare.models[0].weight = Some(ParamValue::Number(0.25));
        dare.models[1]
            .parameters
            .insert("density".into(), ParamValue::Number(0.5));
        let mut slerp = MergeSpec::new("slerp", None, &["a", "b"]).with_value(
            "t",
            ParamValue::Filtered(vec![
                FilterEntry {
                    filter: Some("self_attn".into()),
                    value: ParamValue::Gradient(vec![0.0, 0.5, 0.3, 0.7, 1.0]),
                },
                FilterEntry {
                    filter: None,
                    value: ParamValue::Number(0.5),
                },
            ]),
        );
        slerp.models[1].weight = Some(ParamValue::Gradient(vec![0.1, 1.0 / 3.0]));
        let specs = [
            MergeSpec::new("simple_average", None, &["a"]),
            MergeSpec::new("ties_merging", None, &["math", "code"])
                .with("density", 0.2)
                .with_value("merge_func", ParamValue::Text("mean".into())),
            MergeSpec::new("task_arithmetic", Some("base"), &["x.y", "z_w"])
                .with_value("lambda", ParamValue::Gradient(vec![0.0, 0.25, 1.0])),
            MergeSpec::new("iso_c", Some("base"), &["a", "b"]).with_value(
                "exclude_keys",
                ParamValue::Names(vec![
                    "model.embed_tokens.weight".into(),
                    "model.layers.*.mlp.down_proj.weight".into(),
                ]),
            ),
            dare,
            slerp,
        ];
        for spec in specs {
            let text = to_compact(&spec);
            assert_eq!(
                parse(&text).unwrap(),
                Parsed::Merge(Box::new(spec.clone())),
                "via `{text}`"
            );
        }
    }

    #[test]
    fn compact_form_is_readable() {
        let spec = MergeSpec::new("task_arithmetic", Some("llama"), &["math", "code"])
            .with("scaling_coefficient", 0.3);
        assert_eq!(
            to_compact(&spec),
            "task_arithmetic(math,code;base=llama,scaling_coefficient=0.3)"
        );
    }

    #[test]
    fn dtype_aliases() {
        assert_eq!(dtype_name("bf16"), Some("bfloat16"));
        assert_eq!(dtype_name("torch.float16"), Some("float16"));
        assert_eq!(dtype_name("fp32"), Some("float32"));
        assert_eq!(dtype_name("int8"), None);
    }
}
