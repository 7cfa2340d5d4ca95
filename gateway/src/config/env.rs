//! Environment overrides of the configuration:
//! `FUSION_<SECTION>__<KEY>[__<KEY>…]=value`, segments separated by a double
//! underscore and lower-cased, the value read as YAML (a scalar or a flow
//! collection), a numeric segment indexing a list. Only variables whose first
//! segment is a section name are overrides.

use serde_yaml_ng::Value;

use super::config_error;
use crate::error::Result;

/// Prefix of the environment overrides.
pub const ENV_PREFIX: &str = "FUSION_";
/// Separator of key segments in an environment override.
pub const ENV_SEPARATOR: &str = "__";
/// The top-level sections (the first segment of an override).
pub const SECTIONS: &[&str] = &[
    "server",
    "device",
    "cache",
    "merge",
    "pools",
    "presets",
    "taskpools",
    "evaluations",
];

/// Applies `FUSION_…` overrides from `vars` to a parsed YAML document;
/// returns the names of the variables applied.
pub fn apply_env(
    doc: &mut Value,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>> {
    let mut applied = Vec::new();
    let mut vars: Vec<(String, String)> = vars.into_iter().collect();
    // Deterministic order, so a list index can follow the append that created it.
    vars.sort();
    for (name, raw) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let segments: Vec<String> = rest
            .split(ENV_SEPARATOR)
            .map(str::to_ascii_lowercase)
            .collect();
        if !SECTIONS.contains(&segments[0].as_str()) {
            continue;
        }
        if segments.iter().any(String::is_empty) {
            return Err(config_error(
                name.clone(),
                "empty key segment (separate keys with a double underscore: FUSION_SERVER__BIND)",
            ));
        }
        // A YAML scalar or flow collection; text that is not YAML stays text.
        let value: Value = serde_yaml_ng::from_str(&raw).unwrap_or(Value::String(raw.clone()));
        let value = if value.is_null() && !raw.trim().is_empty() && raw.trim() != "null" {
            Value::String(raw.clone())
        } else {
            value
        };
        set_path(doc, &segments, value).map_err(|reason| config_error(name.clone(), reason))?;
        applied.push(name);
    }
    Ok(applied)
}

fn set_path(node: &mut Value, path: &[String], value: Value) -> std::result::Result<(), String> {
    let (head, rest) = path.split_first().expect("non-empty path");
    if node.is_null() {
        *node = if head.parse::<usize>().is_ok() {
            Value::Sequence(Vec::new())
        } else {
            Value::Mapping(Default::default())
        };
    }
    let child = match node {
        Value::Mapping(map) => {
            let key = Value::String(head.clone());
            if !map.contains_key(&key) {
                map.insert(key.clone(), Value::Null);
            }
            map.get_mut(&key).expect("inserted above")
        }
        Value::Sequence(seq) => {
            let idx: usize = head
                .parse()
                .map_err(|_| format!("`{head}` must be a list index here"))?;
            if idx == seq.len() {
                seq.push(Value::Null);
            }
            let len = seq.len();
            seq.get_mut(idx)
                .ok_or_else(|| format!("index {idx} is past the end of a list of {len}"))?
        }
        _ => return Err(format!("`{head}` is below a value that is not a mapping")),
    };
    if rest.is_empty() {
        *child = value;
        Ok(())
    } else {
        set_path(child, rest, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sets_nested_keys_and_leaves_other_variables() {
        let mut doc: Value = serde_yaml_ng::from_str("server: {bind: a}\ndevice: cpu\n").unwrap();
        let applied = apply_env(
            &mut doc,
            vars(&[
                ("FUSION_SERVER__LIMITS__QUEUE_DEPTH", "3"),
                ("FUSION_LOG", "debug"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(applied, vec!["FUSION_SERVER__LIMITS__QUEUE_DEPTH"]);
        assert_eq!(doc["server"]["limits"]["queue_depth"], Value::from(3));
        assert_eq!(doc["server"]["bind"], Value::from("a"));
        // `:` and `,` in plain text stay text.
        apply_env(&mut doc, vars(&[("FUSION_SERVER__BIND", "0.0.0.0:9000")])).unwrap();
        assert_eq!(doc["server"]["bind"], Value::from("0.0.0.0:9000"));
    }

    #[test]
    fn errors_name_the_variable() {
        let mut doc: Value = serde_yaml_ng::from_str("device: cpu\n").unwrap();
        let e = apply_env(&mut doc, vars(&[("FUSION_DEVICE__X", "1")])).unwrap_err();
        assert!(e.to_string().contains("FUSION_DEVICE__X"), "{e}");
        assert!(e.to_string().contains("not a mapping"), "{e}");
        let e = apply_env(&mut doc, vars(&[("FUSION_SERVER____BIND", "1")])).unwrap_err();
        assert!(e.to_string().contains("empty key segment"), "{e}");
    }
}
