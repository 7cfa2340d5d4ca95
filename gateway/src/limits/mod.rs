//! Request limits (`server.limits`): body size (enforced by the JSON
//! extractor), `max_tokens`, experts per merge, merge-string length, the
//! size of structured specs and of their lists, the parameters that scale a
//! merge's work (handed to the merger as [`merger::Bounds`]: WUDI's
//! iterations, router training steps and batch sizes, ranks), list lengths
//! of other requests; admission control of generations ([`admission`]); and
//! the count of client work that background training yields to
//! ([`traffic`]).

pub mod admission;
pub mod traffic;

use merger::spec::{compact, MergeSpec};
use merger::Bounds;

use crate::config::LimitsConfig;
use crate::error::{GatewayError, Result};

/// `max_tokens` when a request does not say (capped by the configured limit).
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// The checks of `server.limits`.
#[derive(Debug, Clone)]
pub struct Limits {
    cfg: LimitsConfig,
}

impl Limits {
    /// Limits from the configuration.
    pub fn new(cfg: LimitsConfig) -> Self {
        Limits { cfg }
    }

    /// The configured values.
    pub fn config(&self) -> &LimitsConfig {
        &self.cfg
    }

    /// The body size limit in bytes.
    pub fn max_body_bytes(&self) -> usize {
        usize::try_from(self.cfg.max_body_bytes).unwrap_or(usize::MAX)
    }

    /// The `max_tokens` of a request: the requested value when within
    /// `1..=server.limits.max_tokens`, else a 400 naming the range;
    /// [`DEFAULT_MAX_TOKENS`] (capped by the limit) when absent.
    pub fn max_tokens(&self, param: &str, requested: Option<u64>) -> Result<usize> {
        let limit = self.cfg.max_tokens;
        match requested {
            None => Ok(DEFAULT_MAX_TOKENS.min(limit)),
            Some(n) if n >= 1 && n <= limit as u64 => Ok(n as usize),
            Some(n) => Err(GatewayError::bad_param(
                param,
                format!("`{param}` = {n} is out of range: expected 1..={limit} (server.limits.max_tokens)"),
            )),
        }
    }

    /// A compact merge string in the `model` field is at most `max_spec_len` characters.
    pub fn check_spec_len(&self, model: &str) -> Result<()> {
        let n = model.chars().count();
        if n > self.cfg.max_spec_len {
            return Err(GatewayError::TooLarge {
                message: format!(
                    "`model` is {n} characters long; the limit is {} (server.limits.max_spec_len)",
                    self.cfg.max_spec_len
                ),
                param: Some("model".to_string()),
            });
        }
        Ok(())
    }

    /// The bounds of the parameters that scale a merge's work, for the
    /// merger's validation.
    pub fn bounds(&self) -> Bounds {
        Bounds {
            iterations: self.cfg.max_iterations,
            router_steps: self.cfg.max_router_steps as u64,
            batch_size: self.cfg.max_batch_size,
            samples: self.cfg.max_calibration_samples,
            rank: self.cfg.max_rank,
            list_len: self.cfg.max_list_len as u64,
        }
    }

    /// A structured spec of a request (`field`: `merge`): every list at
    /// most `max_list_len` entries (the error names the list), and the spec
    /// written compactly at most `max_spec_len` characters, the limit of a
    /// merge string.
    pub fn check_structured(&self, spec: &MergeSpec, field: &str) -> Result<()> {
        self.bounds()
            .check_lists(spec)
            .map_err(|e| GatewayError::from(e).with_param(field))?;
        let n = compact::to_compact(spec).chars().count();
        if n > self.cfg.max_spec_len {
            return Err(GatewayError::TooLarge {
                message: format!(
                    "`{field}` is {n} characters long written as a merge string; the limit is {} \
                     (server.limits.max_spec_len)",
                    self.cfg.max_spec_len
                ),
                param: Some(field.to_string()),
            });
        }
        Ok(())
    }

    /// A list of a request (`tasks`) has at most `max_list_len` entries.
    pub fn check_list(&self, param: &str, len: usize) -> Result<()> {
        let limit = self.cfg.max_list_len;
        if len > limit {
            return Err(GatewayError::TooLarge {
                message: format!(
                    "`{param}` has {len} entries; the limit is {limit} (server.limits.max_list_len)"
                ),
                param: Some(param.to_string()),
            });
        }
        Ok(())
    }

    /// A merge names at most `max_experts` models.
    pub fn check_experts(&self, spec: &MergeSpec) -> Result<()> {
        let n = spec.models.len();
        if n > self.cfg.max_experts {
            return Err(GatewayError::TooLarge {
                message: format!(
                    "the merge names {n} models; the limit is {} (server.limits.max_experts)",
                    self.cfg.max_experts
                ),
                param: Some("model".to_string()),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use merger::Work;

    use super::*;

    fn limits() -> Limits {
        Limits::new(LimitsConfig {
            max_tokens: 100,
            max_experts: 2,
            max_spec_len: 10,
            ..LimitsConfig::default()
        })
    }

    #[test]
    fn max_tokens_range_and_default() {
        let l = limits();
        assert_eq!(l.max_tokens("max_tokens", None).unwrap(), 100);
        assert_eq!(l.max_tokens("max_tokens", Some(7)).unwrap(), 7);
        assert_eq!(l.max_tokens("max_tokens", Some(100)).unwrap(), 100);
        let e = l.max_tokens("max_tokens", Some(101)).unwrap_err();
        assert_eq!(e.status().as_u16(), 400);
        assert!(e.to_string().contains("1..=100"), "{e}");
        assert!(l.max_tokens("max_tokens", Some(0)).is_err());
        let big = Limits::new(LimitsConfig::default());
        assert_eq!(
            big.max_tokens("max_tokens", None).unwrap(),
            DEFAULT_MAX_TOKENS
        );
    }

    #[test]
    fn spec_length_and_experts() {
        let l = limits();
        assert!(l.check_spec_len("0123456789").is_ok());
        // Characters, not bytes: ten `é` are 20 bytes.
        assert!(l.check_spec_len(&"é".repeat(10)).is_ok());
        assert_eq!(
            l.check_spec_len("0123456789a")
                .unwrap_err()
                .status()
                .as_u16(),
            413
        );
        let ok = MergeSpec::new("simple_average", None, &["a", "b"]);
        assert!(l.check_experts(&ok).is_ok());
        let bad = MergeSpec::new("simple_average", None, &["a", "b", "c"]);
        assert_eq!(l.check_experts(&bad).unwrap_err().status().as_u16(), 413);
    }

    #[test]
    fn work_bounds_come_from_the_limits_and_errors_name_the_key() {
        let l = Limits::new(LimitsConfig {
            max_router_steps: 50,
            max_iterations: 7,
            max_list_len: 3,
            ..LimitsConfig::default()
        });
        let b = l.bounds();
        assert_eq!((b.router_steps, b.iterations, b.list_len), (50, 7, 3));
        let e: GatewayError = b.check("steps", 51, Work::RouterSteps).unwrap_err().into();
        assert_eq!(e.status().as_u16(), 413);
        let m = e.to_string();
        assert!(
            m.contains("`steps` = 51") && m.contains("server.limits.max_router_steps"),
            "{m}"
        );
        assert_eq!(LimitsConfig::default().max_router_steps, 1000);
        let long = MergeSpec::new("task_arithmetic", None, &["a"]).with_value(
            "scaling_coefficient",
            merger::spec::ParamValue::Gradient(vec![0.5; 4]),
        );
        let e = l.check_structured(&long, "merge").unwrap_err();
        assert_eq!(e.status().as_u16(), 413);
        assert!(
            e.to_string().contains("parameters.scaling_coefficient"),
            "{e}"
        );
        assert!(l.check_list("tasks", 3).is_ok());
        assert_eq!(l.check_list("tasks", 4).unwrap_err().status().as_u16(), 413);
    }
}
