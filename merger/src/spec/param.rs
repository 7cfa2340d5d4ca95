//! Parameter values as mergekit allows them: a scalar, a gradient list
//! interpolated across the layers, or a list of `{filter, value}` entries
//! matched against tensor names; plus booleans, strings for options and
//! lists of names (FusionBench's `exclude_keys`).

use serde::{Deserialize, Serialize};

/// Where a tensor sits in the model, for resolving per-tensor parameters.
#[derive(Debug, Clone)]
pub struct TensorCtx {
    /// Full tensor name, e.g. `model.layers.3.mlp.up_proj.weight`.
    pub name: String,
    /// Layer index parsed from `layers.N.` / `h.N.` / `blocks.N.`, if any.
    pub layer: Option<usize>,
    /// Number of layers in the model (max layer index + 1).
    pub num_layers: usize,
    /// The position along the depth when it is not the layer's place in
    /// the model: the layer's place in its slice (see [`crate::slices`]).
    pub at: Option<f64>,
}

impl TensorCtx {
    /// Builds the context of `name` in a model of `num_layers` layers.
    pub fn new(name: &str, num_layers: usize) -> Self {
        TensorCtx {
            name: name.to_string(),
            layer: layer_index(name),
            num_layers,
            at: None,
        }
    }

    /// The context of `name` at position `t` in [0, 1] of the depth.
    pub fn at_depth(name: &str, num_layers: usize, t: f64) -> Self {
        TensorCtx {
            at: Some(t),
            ..Self::new(name, num_layers)
        }
    }

    /// Position in [0, 1] along the depth of the model, used by gradients,
    /// as mergekit places it: layer i of N sits at i/(N−1) (the only layer
    /// of a one-layer model at 1); tensors outside the layers (embeddings,
    /// final norm, lm_head) at 0, since mergekit plans them with t = 0.
    pub fn depth(&self) -> f64 {
        if let Some(t) = self.at {
            return t;
        }
        match self.layer {
            Some(_) if self.num_layers <= 1 => 1.0,
            Some(i) => i as f64 / (self.num_layers - 1) as f64,
            None => 0.0,
        }
    }

    /// True for a 2-D tensor name that is a linear layer's weight (not an
    /// embedding or norm); used by methods restricted to linear weights.
    pub fn is_linear_weight(&self) -> bool {
        self.name.ends_with(".weight")
            && !self.name.contains("embed")
            && !self.name.contains("norm")
    }
}

/// Whether a `{filter, value}` entry's filter selects tensor `name`: a
/// substring of it, or `*` (every tensor), as in mergekit.
pub fn matches_filter(filter: &str, name: &str) -> bool {
    filter == "*" || name.contains(filter)
}

/// Whether a tensor outside the layers sits before them (embeddings), not
/// after (final norm, lm_head, pooler).
pub fn is_input_side(name: &str) -> bool {
    name.contains("embed") || name.contains("wte") || name.contains("wpe")
}

/// The layer index in names like `model.layers.12.self_attn.q_proj.weight`.
pub fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| match w[0] {
        "layers" | "h" | "blocks" | "layer" => w[1].parse().ok(),
        _ => None,
    })
}

/// `name` with its layer index (as [`layer_index`] finds it) replaced by
/// `index`: `model.layers.3.mlp.w` → `model.layers.7.mlp.w`; `None` for a
/// tensor outside the layers.
pub fn with_layer_index(name: &str, index: usize) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    let at = parts.windows(2).position(|w| {
        matches!(w[0], "layers" | "h" | "blocks" | "layer") && w[1].parse::<usize>().is_ok()
    })?;
    let index = index.to_string();
    let mut out: Vec<&str> = parts.clone();
    out[at + 1] = &index;
    Some(out.join("."))
}

/// One `{filter, value}` entry; the entry without a filter is the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterEntry {
    /// Substring matched against the tensor name; absent = matches all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// A scalar or a gradient.
    pub value: ParamValue,
}

/// A parameter value as written in a spec or a mergekit YAML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// `true` / `false`.
    Bool(bool),
    /// A scalar number.
    Number(f64),
    /// A word option such as `merge_func: sum`.
    Text(String),
    /// Values interpolated linearly across the depth of the model.
    Gradient(Vec<f64>),
    /// Values chosen by tensor-name filters, first match wins.
    Filtered(Vec<FilterEntry>),
    /// A list of names, such as FusionBench's `exclude_keys:
    /// [model.embed_tokens.weight]`. (An empty list reads as an empty
    /// [`ParamValue::Gradient`]; [`crate::methods::Params::names`] takes both.)
    Names(Vec<String>),
}

impl ParamValue {
    /// A short description of the kind of value, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ParamValue::Bool(_) => "a boolean",
            ParamValue::Number(_) => "a number",
            ParamValue::Text(_) => "a string",
            ParamValue::Gradient(_) => "a gradient list",
            ParamValue::Filtered(_) => "a filter list",
            ParamValue::Names(_) => "a list of names",
        }
    }

    /// True when the value can be resolved to a number per tensor.
    pub fn is_numeric(&self) -> bool {
        match self {
            ParamValue::Number(_) => true,
            ParamValue::Gradient(g) => !g.is_empty(),
            ParamValue::Filtered(f) => {
                !f.is_empty()
                    && f.iter().all(|e| {
                        e.value.is_numeric() && !matches!(e.value, ParamValue::Filtered(_))
                    })
            }
            _ => false,
        }
    }

    /// Every number the value can resolve to (for range validation).
    pub fn numbers(&self) -> Vec<f64> {
        match self {
            ParamValue::Number(x) => vec![*x],
            ParamValue::Gradient(g) => g.clone(),
            ParamValue::Filtered(f) => f.iter().flat_map(|e| e.value.numbers()).collect(),
            _ => vec![],
        }
    }

    /// The number this value takes for one tensor. `None` when a filter list
    /// has no entry matching the tensor and no default.
    pub fn resolve(&self, ctx: &TensorCtx) -> Option<f64> {
        match self {
            ParamValue::Number(x) => Some(*x),
            ParamValue::Gradient(g) => Some(interpolate(g, ctx.depth())),
            ParamValue::Filtered(entries) => entries
                .iter()
                .find(|e| {
                    e.filter
                        .as_deref()
                        .is_none_or(|f| matches_filter(f, &ctx.name))
                })
                .and_then(|e| e.value.resolve(ctx)),
            ParamValue::Bool(_) | ParamValue::Text(_) | ParamValue::Names(_) => None,
        }
    }
}

/// Pushes every list of `value` (itself, and those inside its filter
/// entries) with its length, named from `path`.
pub(crate) fn lists_of(path: &str, value: &ParamValue, out: &mut Vec<(String, usize)>) {
    match value {
        ParamValue::Gradient(g) => out.push((path.to_string(), g.len())),
        ParamValue::Names(n) => out.push((path.to_string(), n.len())),
        ParamValue::Filtered(entries) => {
            out.push((path.to_string(), entries.len()));
            for (i, e) in entries.iter().enumerate() {
                lists_of(&format!("{path}[{i}].value"), &e.value, out);
            }
        }
        ParamValue::Bool(_) | ParamValue::Number(_) | ParamValue::Text(_) => {}
    }
}

/// Linear interpolation of `g` at position `t` in [0, 1] (mergekit gradients).
pub fn interpolate(g: &[f64], t: f64) -> f64 {
    match g.len() {
        0 => f64::NAN,
        1 => g[0],
        n => {
            let pos = t.clamp(0.0, 1.0) * (n - 1) as f64;
            let i = (pos.floor() as usize).min(n - 2);
            let frac = pos - i as f64;
            g[i] * (1.0 - frac) + g[i + 1] * frac
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_indices() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(layer_index("transformer.h.3.attn.c_attn.weight"), Some(3));
        assert_eq!(layer_index("model.embed_tokens.weight"), None);
    }

    #[test]
    fn layer_indices_are_rewritten() {
        assert_eq!(
            with_layer_index("model.layers.12.mlp.up_proj.weight", 3).as_deref(),
            Some("model.layers.3.mlp.up_proj.weight")
        );
        assert_eq!(
            with_layer_index("encoder.layer.0.attention.self.query.bias", 11).as_deref(),
            Some("encoder.layer.11.attention.self.query.bias")
        );
        assert_eq!(with_layer_index("model.norm.weight", 3), None);
    }

    #[test]
    fn outside_the_layers_gradients_take_their_first_value() {
        // mergekit plans embeddings, the final norm and lm_head with t = 0,
        // the only layer of a one-layer model (or slice) with t = 1, and a
        // `*` filter matches every tensor.
        let g = ParamValue::Gradient(vec![0.2, 0.9]);
        assert_eq!(g.resolve(&TensorCtx::new("lm_head.weight", 4)), Some(0.2));
        assert_eq!(
            g.resolve(&TensorCtx::new("model.embed_tokens.weight", 4)),
            Some(0.2)
        );
        assert_eq!(g.resolve(&TensorCtx::new("model.layers.0.w", 1)), Some(0.9));
        let t = TensorCtx::at_depth("model.layers.5.w", 8, 0.5);
        assert!((g.resolve(&t).unwrap() - 0.55).abs() < 1e-12);
        let f: ParamValue = serde_json::from_str(r#"[{"filter": "*", "value": 3}]"#).unwrap();
        assert_eq!(f.resolve(&TensorCtx::new("anything", 1)), Some(3.0));
    }

    #[test]
    fn gradient_interpolates_across_layers() {
        // 5 layers, gradient [0, 1]: layer 2 sits at t = 2/4 = 0.5.
        let g = ParamValue::Gradient(vec![0.0, 1.0]);
        let ctx = TensorCtx::new("model.layers.2.mlp.up_proj.weight", 5);
        assert_eq!(g.resolve(&ctx), Some(0.5));
        // [0, 0.3, 0.5, 0.7, 1] at layer 1 of 3 (t = 0.5) is exactly 0.5;
        // at layer 1 of 5 (t = 0.25, position 1.0) is 0.3.
        let g = ParamValue::Gradient(vec![0.0, 0.3, 0.5, 0.7, 1.0]);
        assert_eq!(g.resolve(&TensorCtx::new("model.layers.1.x", 3)), Some(0.5));
        assert!((g.resolve(&TensorCtx::new("model.layers.1.x", 5)).unwrap() - 0.3).abs() < 1e-12);
        // Position 0.375*4 = 1.5 between 0.3 and 0.5 → 0.4 (layer 3 of 9).
        assert!((g.resolve(&TensorCtx::new("model.layers.3.x", 9)).unwrap() - 0.4).abs() < 1e-12);
        // Embeddings and the final norm at t = 0, as mergekit plans them.
        let g = ParamValue::Gradient(vec![0.25, 1.0]);
        assert_eq!(
            g.resolve(&TensorCtx::new("model.embed_tokens.weight", 5)),
            Some(0.25)
        );
        assert_eq!(
            g.resolve(&TensorCtx::new("model.norm.weight", 5)),
            Some(0.25)
        );
    }

    #[test]
    fn lists_of_names_read_from_yaml_and_json() {
        let names = ParamValue::Names(vec![
            "model.embed_tokens.weight".into(),
            "lm_head.weight".into(),
        ]);
        let v: ParamValue =
            serde_yaml_ng::from_str("[model.embed_tokens.weight, lm_head.weight]").unwrap();
        assert_eq!(v, names);
        let v: ParamValue =
            serde_json::from_str(r#"["model.embed_tokens.weight","lm_head.weight"]"#).unwrap();
        assert_eq!(v, names);
        assert!(!v.is_numeric());
        assert_eq!(v.resolve(&TensorCtx::new("lm_head.weight", 2)), None);
        // Numbers stay a gradient; a mixed list is neither.
        let v: ParamValue = serde_yaml_ng::from_str("[0, 1]").unwrap();
        assert_eq!(v, ParamValue::Gradient(vec![0.0, 1.0]));
        assert!(serde_yaml_ng::from_str::<ParamValue>("[a, 1]").is_err());
    }

    #[test]
    fn filters_pick_the_first_match() {
        let yaml =
            "- filter: self_attn\n  value: [0, 1]\n- filter: mlp\n  value: 0.25\n- value: 0.5\n";
        let v: ParamValue = serde_yaml_ng::from_str(yaml).unwrap();
        assert!(v.is_numeric());
        assert_eq!(
            v.resolve(&TensorCtx::new("model.layers.0.self_attn.q_proj.weight", 3)),
            Some(0.0)
        );
        assert_eq!(
            v.resolve(&TensorCtx::new("model.layers.2.self_attn.q_proj.weight", 3)),
            Some(1.0)
        );
        assert_eq!(
            v.resolve(&TensorCtx::new("model.layers.1.mlp.up_proj.weight", 3)),
            Some(0.25)
        );
        assert_eq!(
            v.resolve(&TensorCtx::new("model.norm.weight", 3)),
            Some(0.5)
        );
    }
}
