//! The canonical form of a merge spec and the merge id derived from it.
//!
//! Equal requests must share one cache entry, and a changed checkpoint must
//! never serve stale weights. The id is therefore the hash of
//! - the spec in a canonical JSON form: object keys sorted, numbers rounded
//!   to 12 significant digits (so `0.30000000000000004` equals `0.3`, `-0`
//!   equals `0`, and `1` equals `1.0`), the models sorted by name when the
//!   method does not depend on their order, the seed present only for random
//!   methods (absent counts as 0), the method name as given, the dialect
//!   (defaults differ between FusionBench and mergekit) and the output dtype
//!   under its canonical spelling; the pool is left out, since the
//!   checkpoints' fingerprints already say what the names stand for;
//! - every `(checkpoint name, fingerprint)` pair, sorted by name.
//!
//! `merge_id` = the first 16 bytes of SHA-256 over both, as 32 hex digits,
//! without the `merge-` prefix (callers add it).

use std::collections::BTreeMap;

use serde_json::{Map, Number, Value};
use sha2::{Digest, Sha256};

use super::compact::dtype_name;
use crate::spec::residency::Truncation;
use crate::spec::{Dialect, Form, MergeSpec, ModelSpec, ParamValue};

/// Significant digits kept when normalising numbers.
const SIGNIFICANT_DIGITS: usize = 12;

/// Number of bytes of the SHA-256 digest kept in a merge id.
const ID_BYTES: usize = 16;

/// The canonical JSON form of `spec` (see the module docs).
pub fn canonical_json(spec: &MergeSpec, order_matters: bool, random: bool) -> Value {
    let mut obj = Map::new();
    obj.insert("method".into(), Value::String(spec.method.clone()));
    let dialect = match spec.dialect {
        Dialect::Fusionbench => "fusionbench",
        Dialect::Mergekit => "mergekit",
    };
    obj.insert("dialect".into(), Value::String(dialect.into()));
    if let Some(base) = &spec.base {
        obj.insert("base".into(), Value::String(base.clone()));
    }
    let mut models: Vec<(String, Value)> = spec
        .models
        .iter()
        .map(|m| {
            let v = model_json(m);
            (to_canonical_string(&v), v)
        })
        .collect();
    if !order_matters {
        // By name; a model listed twice is ordered by its canonical text.
        models.sort_by(|(ta, a), (tb, b)| {
            a["name"]
                .as_str()
                .cmp(&b["name"].as_str())
                .then_with(|| ta.cmp(tb))
        });
    }
    obj.insert(
        "models".into(),
        Value::Array(models.into_iter().map(|(_, v)| v).collect()),
    );
    // A structured `task` is the parameter `task` ([`MergeSpec::fold_task`]).
    let mut parameters = spec.parameters.clone();
    if let Some(task) = &spec.task {
        parameters
            .entry("task".into())
            .or_insert_with(|| ParamValue::Text(task.clone()));
    }
    obj.insert("parameters".into(), params_json(&parameters));
    if random {
        obj.insert("seed".into(), Value::Number(spec.seed.unwrap_or(0).into()));
    }
    if let Some(dtype) = &spec.dtype {
        let name = dtype_name(dtype).unwrap_or(dtype);
        obj.insert("dtype".into(), Value::String(name.into()));
    }
    // A delta form is a different model from the dense merge; `dense`
    // written out is the same model as no residency at all.
    if let Some(r) = spec.residency.as_ref().filter(|r| r.is_delta()) {
        let mut form = Map::new();
        form.insert("form".into(), Value::String(r.form.as_str().into()));
        if r.is_combination() {
            form.insert(
                "vectors".into(),
                Value::String(r.shaped_form().as_str().into()),
            );
        }
        match r.shaped_form() {
            Form::Lowrank => match r.truncation() {
                Truncation::Energy(e) => {
                    form.insert("energy".into(), number(e));
                }
                Truncation::Rank(k) => {
                    form.insert("rank".into(), Value::Number((k as u64).into()));
                }
            },
            Form::Sparse => {
                form.insert("density".into(), number(r.density()));
            }
            Form::Dense | Form::Combination | Form::Masked => {}
        }
        obj.insert("residency".into(), Value::Object(form));
    }
    Value::Object(obj)
}

/// The id of a merge: 32 hex digits, without the `merge-` prefix.
///
/// `order_matters` and `random` are the method's (its registry entry's
/// [`crate::methods::MethodInfo::merge_id`] passes them); `fingerprints`
/// pairs each checkpoint name the spec uses with its fingerprint; their
/// order does not matter.
pub fn merge_id(
    spec: &MergeSpec,
    order_matters: bool,
    random: bool,
    fingerprints: &[(String, String)],
) -> String {
    let mut pairs: Vec<(&str, &str)> = fingerprints
        .iter()
        .map(|(n, f)| (n.as_str(), f.as_str()))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let checkpoints: Vec<Value> = pairs
        .into_iter()
        .map(|(n, f)| Value::Array(vec![Value::String(n.into()), Value::String(f.into())]))
        .collect();
    let mut doc = Map::new();
    doc.insert("spec".into(), canonical_json(spec, order_matters, random));
    doc.insert("checkpoints".into(), Value::Array(checkpoints));
    let digest = Sha256::digest(to_canonical_string(&Value::Object(doc)).as_bytes());
    digest[..ID_BYTES]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A merge id (hex of the first bytes of SHA-256) of `text`: for merges
/// whose id also covers what the spec does not hold (a sliced layout, an
/// output vocabulary).
pub fn digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())[..ID_BYTES]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serialises `value` with every object's keys sorted and no whitespace,
/// independently of serde_json's map ordering features.
pub fn to_canonical_string(value: &Value) -> String {
    let mut out = String::new();
    write_sorted(value, &mut out);
    out
}

fn write_sorted(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_sorted(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_sorted(&map[key], out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A model as `{name, parameters}`, its weight among the parameters (the
/// methods read `ModelSpec::weight` first, then `parameters.weight`).
fn model_json(m: &ModelSpec) -> Value {
    let mut params = m.parameters.clone();
    if let Some(w) = &m.weight {
        params.insert("weight".into(), w.clone());
    }
    let mut obj = Map::new();
    obj.insert("name".into(), Value::String(m.name.clone()));
    obj.insert("parameters".into(), params_json(&params));
    Value::Object(obj)
}

fn params_json(params: &BTreeMap<String, ParamValue>) -> Value {
    Value::Object(
        params
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &ParamValue) -> Value {
    match v {
        ParamValue::Bool(b) => Value::Bool(*b),
        ParamValue::Number(x) => number(*x),
        ParamValue::Text(s) => Value::String(s.clone()),
        ParamValue::Gradient(g) => Value::Array(g.iter().map(|x| number(*x)).collect()),
        ParamValue::Names(names) => {
            Value::Array(names.iter().map(|n| Value::String(n.clone())).collect())
        }
        ParamValue::Filtered(entries) => Value::Array(
            entries
                .iter()
                .map(|e| {
                    let mut obj = Map::new();
                    if let Some(f) = &e.filter {
                        obj.insert("filter".into(), Value::String(f.clone()));
                    }
                    obj.insert("value".into(), value_json(&e.value));
                    Value::Object(obj)
                })
                .collect(),
        ),
    }
}

/// `x` rounded to 12 significant digits; integers as JSON integers, so
/// `1` and `1.0` (and `-0.0` and `0`) are written alike. Non-finite values,
/// which validation rejects anyway, become strings rather than panicking.
fn number(x: f64) -> Value {
    if !x.is_finite() {
        return Value::String(x.to_string());
    }
    let rounded: f64 = format!("{x:.prec$e}", prec = SIGNIFICANT_DIGITS - 1)
        .parse()
        .expect("a formatted float parses");
    // Below 2^53 every integer-valued f64 is exactly an i64.
    if rounded.fract() == 0.0 && rounded.abs() < 9_007_199_254_740_992.0 {
        Value::Number(Number::from(rounded as i64))
    } else {
        Number::from_f64(rounded).map_or(Value::Null, Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::lookup;
    use crate::spec::compact::{parse, Parsed};

    fn spec(text: &str) -> MergeSpec {
        match parse(text).unwrap() {
            Parsed::Merge(s) => *s,
            other => panic!("{other:?}"),
        }
    }

    fn fps(names: &[&str]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (n.to_string(), format!("fp-{n}")))
            .collect()
    }

    fn id(s: &MergeSpec) -> String {
        let info = lookup(&s.method).unwrap();
        let names: Vec<&str> = s.checkpoint_names();
        info.merge_id(s, &fps(&names))
    }

    #[test]
    fn equivalent_specs_share_an_id() {
        let pairs = [
            // Model order on an order-free method.
            (
                "ties_merging(math,code;base=llama,density=0.2)",
                "ties_merging(code,math;base=llama,density=0.2)",
            ),
            // Float noise.
            (
                "task_arithmetic(a,b;base=c,scaling_coefficient=0.3)",
                "task_arithmetic(a,b;base=c,scaling_coefficient=0.30000000000000004)",
            ),
            // 1 and 1.0, -0 and 0.
            (
                "task_arithmetic(a:1,b:-0;base=c)",
                "task_arithmetic(a:1.0,b:0.0;base=c)",
            ),
            // Parameter order.
            (
                "ties_merging(a,b;base=c,density=0.2,scaling_coefficient=0.3)",
                "ties_merging(a,b;scaling_coefficient=0.3,base=c,density=0.2)",
            ),
            // Weight as `:w` or as a per-model parameter.
            (
                "task_arithmetic(a:0.5,b;base=c)",
                "task_arithmetic(a{weight=0.5},b;base=c)",
            ),
            // dare: absent seed counts as 0; dtype spelling.
            (
                "dare(a,b;base=c,dtype=bf16)",
                "dare(a,b;base=c,seed=0,dtype=bfloat16)",
            ),
            // Seed on a non-random method is ignored.
            (
                "ties_merging(a,b;base=c,seed=1)",
                "ties_merging(a,b;base=c,seed=2)",
            ),
            // The pool does not enter the id.
            ("demo/simple_average(a,b)", "simple_average(a,b)"),
        ];
        for (x, y) in pairs {
            assert_eq!(id(&spec(x)), id(&spec(y)), "`{x}` vs `{y}`");
        }
        // Key order in structured JSON.
        let a: MergeSpec = serde_json::from_str(
            r#"{"method":"ties_merging","base":"c","models":[{"name":"a","weight":1}],"parameters":{"density":0.2,"scaling_coefficient":0.3}}"#,
        )
        .unwrap();
        let b: MergeSpec = serde_json::from_str(
            r#"{"parameters":{"scaling_coefficient":0.3,"density":0.2},"models":[{"weight":1.0,"name":"a"}],"base":"c","method":"ties_merging"}"#,
        )
        .unwrap();
        assert_eq!(id(&a), id(&b));
    }

    #[test]
    fn different_specs_get_different_ids() {
        let pairs = [
            (
                "ties_merging(a,b;base=c,density=0.2)",
                "ties_merging(a,b;base=c,density=0.3)",
            ),
            ("dare(a,b;base=c,seed=1)", "dare(a,b;base=c,seed=2)"),
            ("slerp(a,b)", "slerp(b,a)"),
            ("task_arithmetic(a,b;base=c)", "task_arithmetic(a,b;base=d)"),
            (
                "task_arithmetic(a:0.5,b;base=c)",
                "task_arithmetic(a,b:0.5;base=c)",
            ),
            ("simple_average(a,b)", "simple_average(a,b;dtype=float16)"),
            ("ties(a,b;base=c)", "ties_merging(a,b;base=c)"),
            ("slerp(a,b;t=[0,1])", "slerp(a,b;t=[0,0.5,1])"),
        ];
        for (x, y) in pairs {
            assert_ne!(id(&spec(x)), id(&spec(y)), "`{x}` vs `{y}`");
        }
        // Same spec in the other dialect (mergekit's λ default is 1.0).
        let fb = spec("task_arithmetic(a,b;base=c)");
        let mut mk = fb.clone();
        mk.dialect = Dialect::Mergekit;
        assert_ne!(id(&fb), id(&mk));
    }

    #[test]
    fn fingerprints_enter_the_id() {
        let s = spec("task_arithmetic(a,b;base=c)");
        let info = lookup("task_arithmetic").unwrap();
        let fp = fps(&["c", "a", "b"]);
        let mut reordered = fp.clone();
        reordered.reverse();
        assert_eq!(info.merge_id(&s, &fp), info.merge_id(&s, &reordered));
        let mut changed = fp.clone();
        changed[1].1 = "fp-a-retrained".into();
        assert_ne!(info.merge_id(&s, &fp), info.merge_id(&s, &changed));
    }

    #[test]
    fn canonical_text_is_fixed() {
        // The canonical form is a cache key that outlives the process: pin it.
        let s = spec(
            "task_arithmetic(b:1.0,a:0.30000000000000004;base=c,scaling_coefficient=0.3,seed=9)",
        );
        let text = to_canonical_string(&canonical_json(&s, false, false));
        assert_eq!(
            text,
            r#"{"base":"c","dialect":"fusionbench","method":"task_arithmetic","models":[{"name":"a","parameters":{"weight":0.3}},{"name":"b","parameters":{"weight":1}}],"parameters":{"scaling_coefficient":0.3}}"#
        );
        let with_seed = to_canonical_string(&canonical_json(&s, true, true));
        assert!(
            with_seed.contains(r#""models":[{"name":"b""#) && with_seed.ends_with(r#","seed":9}"#),
            "{with_seed}"
        );
        // The id is SHA-256 of {"checkpoints":[["a","x"]],"spec":<text>}, first
        // 16 bytes; the literal comes from `printf '%s' '...' | sha256sum`.
        let info = lookup("task_arithmetic").unwrap();
        let id = info.merge_id(&s, &[("a".into(), "x".into())]);
        assert_eq!(id, "4f3e898f446a0a96a26f06c00a4f5914");
        assert_eq!(id.len(), 32);
    }

    #[test]
    fn numbers_are_normalised() {
        assert_eq!(number(0.30000000000000004), number(0.3));
        assert_eq!(number(-0.0).to_string(), "0");
        assert_eq!(number(1.0).to_string(), "1");
        assert_eq!(number(1e-3).to_string(), "0.001");
        // 12 significant digits: 0.1234567890123 → 0.123456789012.
        assert_eq!(number(0.1234567890123), number(0.123456789012));
        assert_ne!(number(0.123456789012), number(0.123456789013));
        assert_eq!(number(f64::NAN), Value::String("NaN".into()));
    }
}
