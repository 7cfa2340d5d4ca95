//! Request limits (`server.limits`): body size (enforced by the JSON
//! extractor), `max_tokens`, experts per merge and merge-string length; and
//! admission control of generations ([`admission`]).

pub mod admission;

use merger::spec::MergeSpec;

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
}
