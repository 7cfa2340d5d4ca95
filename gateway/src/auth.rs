//! Bearer API keys.
//!
//! - Public routes (`/health/*`, `/metrics`, `/openapi.json`, `/docs`) need no key.
//! - The OpenAI routes (`/v1/chat/completions`, `/v1/completions`,
//!   `/v1/embeddings`, `/v1/models`) need a key of `server.api_keys` or
//!   `server.admin_keys` when `api_keys` is not empty.
//! - The merges and evaluations APIs (`/v1/merges…`, `/v1/evaluations…`)
//!   need a key of `server.admin_keys`; a user key gets 403. When
//!   `admin_keys` is empty they follow the rule of the OpenAI routes.
//!
//! No key, or an unknown one, is 401.

use crate::error::{GatewayError, Result};

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone.
    Public,
    /// Holders of an API key (when keys are configured).
    User,
    /// Holders of an admin key (when admin keys are configured).
    Admin,
}

/// The route class of a request path.
pub fn access_of(path: &str) -> Access {
    let under = |prefix: &str| {
        path == prefix
            || path
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    if under("/v1/merges") || under("/v1/evaluations") {
        Access::Admin
    } else if under("/v1") {
        Access::User
    } else {
        Access::Public
    }
}

/// The configured keys.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    user: Vec<String>,
    admin: Vec<String>,
}

/// Compares in time independent of where the strings differ.
fn same_key(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() ^ b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

fn contains(keys: &[String], token: &str) -> bool {
    // Every key is compared, so timing does not reveal which one matched.
    keys.iter()
        .fold(false, |found, k| same_key(k, token) | found)
}

impl Keys {
    /// Keys of the OpenAI routes and of the admin APIs.
    pub fn new(user: Vec<String>, admin: Vec<String>) -> Self {
        Keys { user, admin }
    }

    /// Checks the `Authorization` header value of a request to `path`.
    pub fn authorize(&self, path: &str, authorization: Option<&str>) -> Result<()> {
        let access = access_of(path);
        let needs_admin = access == Access::Admin && !self.admin.is_empty();
        let needs_user = access != Access::Public && !self.user.is_empty();
        if !needs_admin && !needs_user {
            return Ok(());
        }
        let token = authorization
            .and_then(|h| {
                let (scheme, token) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or_else(|| {
                GatewayError::Unauthorized(
                    "missing `Authorization: Bearer <key>` header".to_string(),
                )
            })?;
        let is_admin = contains(&self.admin, token);
        let is_user = contains(&self.user, token);
        if needs_admin {
            return if is_admin {
                Ok(())
            } else if is_user {
                Err(GatewayError::Forbidden(format!(
                    "`{path}` needs an admin key (`server.admin_keys`); this is a user key"
                )))
            } else {
                Err(GatewayError::Unauthorized("invalid API key".to_string()))
            };
        }
        if is_user || is_admin {
            Ok(())
        } else {
            Err(GatewayError::Unauthorized("invalid API key".to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: Result<()>) -> u16 {
        match r {
            Ok(()) => 200,
            Err(e) => e.status().as_u16(),
        }
    }

    #[test]
    fn route_classes() {
        assert_eq!(access_of("/v1/merges"), Access::Admin);
        assert_eq!(access_of("/v1/merges/merge-00"), Access::Admin);
        assert_eq!(access_of("/v1/evaluations"), Access::Admin);
        assert_eq!(access_of("/v1/mergesx"), Access::User);
        assert_eq!(access_of("/v1/chat/completions"), Access::User);
        assert_eq!(access_of("/health/live"), Access::Public);
        assert_eq!(access_of("/metrics"), Access::Public);
        assert_eq!(access_of("/v1x"), Access::Public);
    }

    #[test]
    fn no_keys_means_open() {
        let k = Keys::default();
        assert_eq!(status(k.authorize("/v1/merges", None)), 200);
        assert_eq!(status(k.authorize("/v1/models", None)), 200);
    }

    #[test]
    fn user_and_admin_keys() {
        let k = Keys::new(vec!["u1".into()], vec!["a1".into()]);
        let chat = "/v1/chat/completions";
        assert_eq!(status(k.authorize(chat, None)), 401);
        assert_eq!(status(k.authorize(chat, Some("Bearer nope"))), 401);
        assert_eq!(status(k.authorize(chat, Some("Basic u1"))), 401);
        assert_eq!(status(k.authorize(chat, Some("Bearer u1"))), 200);
        assert_eq!(status(k.authorize(chat, Some("bearer  a1 "))), 200);
        assert_eq!(status(k.authorize("/v1/merges", Some("Bearer u1"))), 403);
        assert_eq!(status(k.authorize("/v1/merges", Some("Bearer a1"))), 200);
        assert_eq!(status(k.authorize("/v1/merges", Some("Bearer u"))), 401);
        assert_eq!(status(k.authorize("/v1/merges", None)), 401);
        assert_eq!(status(k.authorize("/metrics", None)), 200);
    }

    #[test]
    fn admin_only_or_user_only() {
        // Only admin keys: the OpenAI routes are open, the admin APIs are not.
        let k = Keys::new(vec![], vec!["a1".into()]);
        assert_eq!(status(k.authorize("/v1/models", None)), 200);
        assert_eq!(status(k.authorize("/v1/merges", None)), 401);
        // Only user keys: the admin APIs follow them.
        let k = Keys::new(vec!["u1".into()], vec![]);
        assert_eq!(status(k.authorize("/v1/merges", Some("Bearer u1"))), 200);
        assert_eq!(status(k.authorize("/v1/merges", None)), 401);
    }

    #[test]
    fn key_comparison() {
        assert!(same_key("abc", "abc"));
        assert!(!same_key("abc", "abd"));
        assert!(!same_key("abc", "ab"));
        assert!(!same_key("", "a"));
    }
}
