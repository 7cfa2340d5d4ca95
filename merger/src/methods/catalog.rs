//! The method registry as documents, all printed from the same data
//! ([`super::REGISTRY`] and each method's declared [`Param`]s): the plain
//! table of `fusion methods`, its `--json`, the README's method table
//! (`fusion methods --markdown`) and the parameter reference of
//! `docs/merging.md`. A test of the workspace fails when the README or the
//! reference differs from what this module prints.

use serde_json::{json, Value};

use super::schema::{DefaultValue, Param, Scope, Type};
use super::{Arity, BaseUse, MethodInfo, MethodKind, REGISTRY};

fn models(m: &MethodInfo) -> String {
    match m.arity {
        Arity::Exactly(k) => format!("{k}"),
        Arity::AtLeast(k) => format!("{k}+"),
    }
}

fn base(m: &MethodInfo) -> &'static str {
    match m.base {
        BaseUse::Required => "yes",
        BaseUse::Optional => "optional",
        BaseUse::Unused => "no",
    }
}

fn kind(m: &MethodInfo) -> &'static str {
    match m.kind {
        MethodKind::Tensorwise(_) => "tensorwise",
        MethodKind::Routed => "routed",
        MethodKind::DataDriven => "data_driven",
    }
}

fn spellings(p: &Param) -> String {
    let mut s = format!("`{}`", p.name);
    if !p.aliases.is_empty() {
        let aliases: Vec<String> = p.aliases.iter().map(|a| format!("`{a}`")).collect();
        s.push_str(&format!(" (also {})", aliases.join(", ")));
    }
    s
}

fn scope(p: &Param) -> &'static str {
    match p.scope {
        Scope::Global => "global",
        Scope::PerModel => "per model",
    }
}

/// The default as JSON: a number, a bool, a word, `[]`, `null` (unset) or,
/// for a default that depends on the spec, `{"fusionbench": x,
/// "mergekit": y}` or `{"depends": "text"}`.
fn default_json(d: DefaultValue) -> Value {
    match d {
        DefaultValue::Number(x) => json!(x),
        DefaultValue::ByDialect {
            fusionbench,
            mergekit,
        } => json!({"fusionbench": fusionbench, "mergekit": mergekit}),
        DefaultValue::Bool(b) => json!(b),
        DefaultValue::Word(w) => json!(w),
        DefaultValue::Empty => json!([]),
        DefaultValue::Unset => Value::Null,
        DefaultValue::Depends(text) => json!({ "depends": text }),
    }
}

fn limit_json(l: super::schema::Limit) -> Value {
    use super::schema::Limit;
    match l {
        Limit::Open => Value::Null,
        Limit::Inclusive(x) => json!({"value": x, "inclusive": true}),
        Limit::Exclusive(x) => json!({"value": x, "inclusive": false}),
    }
}

fn param_json(p: &Param) -> Value {
    let numeric = matches!(p.ty, Type::Number | Type::Scalar | Type::Integer);
    json!({
        "name": p.name,
        "aliases": p.aliases,
        "type": p.ty.key(),
        "choices": match p.ty { Type::Choice(options) => json!(options), _ => Value::Null },
        "scope": match p.scope { Scope::Global => "global", Scope::PerModel => "per_model" },
        "default": default_json(p.default),
        "range": if numeric {
            json!({"min": limit_json(p.range.min), "max": limit_json(p.range.max), "text": p.range.describe()})
        } else {
            Value::Null
        },
        "bounded_by": p.work.map(|w| w.unit()),
        "doc": p.doc,
    })
}

/// Every method with its parameters, machine-readable (`fusion methods
/// --json`).
pub fn json() -> Value {
    Value::Array(
        REGISTRY
            .iter()
            .map(|m| {
                json!({
                    "name": m.name,
                    "convention": m.convention,
                    "kind": kind(m),
                    "models": match m.arity {
                        Arity::Exactly(k) => json!({"exactly": k}),
                        Arity::AtLeast(k) => json!({"at_least": k}),
                    },
                    "base": match m.base {
                        BaseUse::Required => "required",
                        BaseUse::Optional => "optional",
                        BaseUse::Unused => "unused",
                    },
                    "order_matters": m.order_matters,
                    "seeded": m.random,
                    "parameters": m.params.iter().map(|p| param_json(p)).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

/// The parameters of one method as one line: `` `density` 0.2, in (0, 1];
/// ... ``.
fn summary(m: &MethodInfo) -> String {
    if m.params.is_empty() {
        return "–".into();
    }
    m.params
        .iter()
        .map(|p| {
            let mut s = format!("`{}`", p.name);
            if p.scope == Scope::PerModel {
                s.push_str(" (per model)");
            }
            match p.ty {
                Type::Choice(options) => s.push_str(&format!(
                    " {}",
                    options
                        .iter()
                        .map(|o| if DefaultValue::Word(o) == p.default {
                            format!("**{o}**")
                        } else {
                            o.to_string()
                        })
                        .collect::<Vec<_>>()
                        .join(" | ")
                )),
                _ => {
                    if p.default != DefaultValue::Unset {
                        s.push_str(&format!(" = {}", p.default.describe()));
                    }
                    let range = p.describe_range();
                    if range != "–" && range != "finite" {
                        s.push_str(&format!(", {range}"));
                    }
                }
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The README's method table (`fusion methods --markdown`): one row per
/// method, its parameters with defaults and ranges (choices with the
/// default in bold).
pub fn markdown() -> String {
    let mut out = String::from(
        "| method | follows | models | base θ0 | seeded | parameters (default, range) |\n|---|---|---|---|---|---|\n",
    );
    for m in REGISTRY {
        out.push_str(&format!(
            "| `{}`{} | {} | {} | {} | {} | {} |\n",
            m.name,
            match m.kind {
                MethodKind::Routed => " (routed)",
                MethodKind::DataDriven => " (data-driven)",
                MethodKind::Tensorwise(_) => "",
            },
            m.convention,
            models(m),
            base(m),
            if m.random { "yes" } else { "no" },
            summary(m).replace('|', "\\|"),
        ));
    }
    out
}

/// The parameter reference of `docs/merging.md`: per method, a table of
/// its parameters with spellings, type, scope, default, range and doc.
pub fn reference() -> String {
    let mut out = String::new();
    for m in REGISTRY {
        out.push_str(&format!("### `{}`\n\n", m.name));
        if m.params.is_empty() {
            out.push_str("No parameters.\n\n");
            continue;
        }
        out.push_str(
            "| parameter | type | scope | default | range | what it does |\n|---|---|---|---|---|---|\n",
        );
        for p in m.params {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                spellings(p),
                p.ty.describe().replace('|', "\\|"),
                scope(p),
                p.default.describe().replace('|', "\\|"),
                p.describe_range(),
                p.doc.replace('|', "\\|"),
            ));
        }
        out.push('\n');
    }
    out
}

/// The plain listing of `fusion methods` (all methods, or those named in
/// `only`): one line per method, then one per parameter.
pub fn text(only: &[String]) -> String {
    let mut out = format!(
        "{:<18} {:<12} {:<11} {:<7} {:<9} {:<7}\n",
        "method", "convention", "kind", "models", "base", "seeded"
    );
    for m in REGISTRY
        .iter()
        .filter(|m| only.is_empty() || only.iter().any(|o| o == m.name))
    {
        out.push_str(&format!(
            "{:<18} {:<12} {:<11} {:<7} {:<9} {:<7}\n",
            m.name,
            m.convention,
            kind(m),
            models(m),
            base(m),
            if m.random { "yes" } else { "no" }
        ));
        for p in m.params {
            let mut name = p.name.to_string();
            if !p.aliases.is_empty() {
                name.push_str(&format!(" ({})", p.aliases.join(", ")));
            }
            let ty = p.ty.describe();
            out.push_str(&format!(
                "    {:<46} {:<20} {:<10} default {:<28} {:<14} {}\n",
                name,
                ty,
                scope(p),
                p.default.describe(),
                p.describe_range(),
                p.doc
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_listed_in_each_document() {
        let md = markdown();
        let reference = reference();
        let text = text(&[]);
        let json = json();
        assert_eq!(json.as_array().unwrap().len(), REGISTRY.len());
        for m in REGISTRY {
            assert!(md.contains(&format!("| `{}`", m.name)), "{}", m.name);
            assert!(reference.contains(&format!("### `{}`", m.name)));
            assert!(text.lines().any(|l| l.starts_with(m.name)));
            let entry = json
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == m.name)
                .unwrap();
            let names: Vec<&str> = entry["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            let declared: Vec<&str> = m.params.iter().map(|p| p.name).collect();
            assert_eq!(names, declared, "{}", m.name);
        }
    }

    #[test]
    fn documents_show_defaults_and_ranges() {
        let ties = REGISTRY.iter().find(|m| m.name == "ties_merging").unwrap();
        let line = summary(ties);
        assert!(line.contains("`density` = 0.2, in (0, 1]"), "{line}");
        assert!(line.contains("`merge_func` **sum** | mean | max"), "{line}");
        let entry = json()
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "wudi")
            .cloned()
            .unwrap();
        let iterations = &entry["parameters"][0];
        assert_eq!(iterations["name"], "iterations");
        assert_eq!(iterations["default"], 400.0);
        assert_eq!(iterations["range"]["min"]["value"], 1.0);
        assert_eq!(iterations["bounded_by"], "optimiser iterations");
        assert_eq!(iterations["aliases"][0], "iter_num");
        let ta = json()
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "task_arithmetic")
            .cloned()
            .unwrap();
        assert_eq!(ta["parameters"][0]["default"]["mergekit"], 1.0);
        assert_eq!(ta["parameters"][0]["default"]["fusionbench"], 0.3);
        let only = text(&["slerp".to_string()]);
        assert_eq!(only.lines().count(), 1 + 1 + 3, "{only}");
        assert!(only.contains("dot_threshold (DOT_THRESHOLD)"), "{only}");
    }
}
