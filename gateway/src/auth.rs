//! Bearer API keys.
//!
//! - Public routes (`/health/*`, `/metrics`, `/openapi.json`, `/docs`) need no key.
//! - The OpenAI routes (`/v1/chat/completions`, `/v1/completions`,
//!   `/v1/embeddings`, `/v1/classifications`, `/v1/models`) need a key of
//!   `server.api_keys` or `server.admin_keys` when `api_keys` is not empty.
//! - The merges, evaluations and searches APIs (`/v1/merges…`,
//!   `/v1/evaluations…`, `/v1/searches…`)
//!   need a key of `server.admin_keys`; a user key gets 403. When
//!   `admin_keys` is empty they follow the rule of the OpenAI routes.
//!
//! No key, or an unknown one, is 401.
//!
//! The class is decided on the route the request is routed to (its pattern
//! in [`ROUTES`]), never on the path string, so encoded or odd spellings of a
//! path cannot reach a route under another route's class.

use crate::error::{GatewayError, Result};
use crate::paths;

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

/// The access class of a route, by the pattern the router matched
/// (`/v1/merges/{id}`), never by the request's path string: percent-encoded,
/// double-slash or dot-segment spellings of a path reach the class of the
/// route they are routed to. `None` (no route matched: the 404 handler) is
/// public; a matched pattern missing from [`ROUTES`] needs an admin key, so
/// a route added without a class fails closed.
pub fn access_of_route(pattern: Option<&str>) -> Access {
    match pattern {
        None => Access::Public,
        Some(p) => ROUTES
            .iter()
            .find(|(route, _)| *route == p)
            .map_or(Access::Admin, |&(_, access)| access),
    }
}

/// Every route pattern of the gateway with its access class.
pub const ROUTES: &[(&str, Access)] = &[
    (paths::CHAT, Access::User),
    (paths::COMPLETIONS, Access::User),
    (paths::EMBEDDINGS, Access::User),
    (paths::CLASSIFICATIONS, Access::User),
    (paths::MODELS, Access::User),
    (paths::MERGES, Access::Admin),
    (paths::MERGE, Access::Admin),
    (paths::EVALUATIONS, Access::Admin),
    (paths::SEARCHES, Access::Admin),
    (paths::SEARCH, Access::Admin),
    (paths::LIVE, Access::Public),
    (paths::READY, Access::Public),
    (paths::METRICS, Access::Public),
    (paths::OPENAPI, Access::Public),
    (paths::DOCS, Access::Public),
    (paths::DOCS_FILES, Access::Public),
];

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

    /// Checks the `Authorization` header value of a request to a route of
    /// class `access` (`route` names it in the 403 message).
    pub fn authorize(
        &self,
        access: Access,
        route: &str,
        authorization: Option<&str>,
    ) -> Result<()> {
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
                    "`{route}` needs an admin key (`server.admin_keys`); this is a user key"
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
        let of = |p: &str| access_of_route(Some(p));
        assert_eq!(of(paths::MERGES), Access::Admin);
        assert_eq!(of(paths::MERGE), Access::Admin);
        assert_eq!(of(paths::EVALUATIONS), Access::Admin);
        assert_eq!(of(paths::CHAT), Access::User);
        assert_eq!(of(paths::MODELS), Access::User);
        assert_eq!(of(paths::LIVE), Access::Public);
        assert_eq!(of(paths::METRICS), Access::Public);
        assert_eq!(of(paths::DOCS_FILES), Access::Public);
        // No route matched: the 404 handler.
        assert_eq!(access_of_route(None), Access::Public);
        // A matched pattern without a class fails closed.
        assert_eq!(of("/v1/something-new"), Access::Admin);
    }

    #[test]
    fn no_keys_means_open() {
        let k = Keys::default();
        assert_eq!(status(k.authorize(Access::Admin, "/v1/merges", None)), 200);
        assert_eq!(status(k.authorize(Access::User, "/v1/models", None)), 200);
    }

    #[test]
    fn user_and_admin_keys() {
        let k = Keys::new(vec!["u1".into()], vec!["a1".into()]);
        let chat = "/v1/chat/completions";
        assert_eq!(status(k.authorize(Access::User, chat, None)), 401);
        assert_eq!(
            status(k.authorize(Access::User, chat, Some("Bearer nope"))),
            401
        );
        assert_eq!(
            status(k.authorize(Access::User, chat, Some("Basic u1"))),
            401
        );
        assert_eq!(
            status(k.authorize(Access::User, chat, Some("Bearer u1"))),
            200
        );
        assert_eq!(
            status(k.authorize(Access::User, chat, Some("bearer  a1 "))),
            200
        );
        assert_eq!(
            status(k.authorize(Access::Admin, "/v1/merges", Some("Bearer u1"))),
            403
        );
        assert_eq!(
            status(k.authorize(Access::Admin, "/v1/merges", Some("Bearer a1"))),
            200
        );
        assert_eq!(
            status(k.authorize(Access::Admin, "/v1/merges", Some("Bearer u"))),
            401
        );
        assert_eq!(status(k.authorize(Access::Admin, "/v1/merges", None)), 401);
        assert_eq!(status(k.authorize(Access::Public, "/metrics", None)), 200);
    }

    #[test]
    fn admin_only_or_user_only() {
        // Only admin keys: the OpenAI routes are open, the admin APIs are not.
        let k = Keys::new(vec![], vec!["a1".into()]);
        assert_eq!(status(k.authorize(Access::User, "/v1/models", None)), 200);
        assert_eq!(status(k.authorize(Access::Admin, "/v1/merges", None)), 401);
        // Only user keys: the admin APIs follow them.
        let k = Keys::new(vec!["u1".into()], vec![]);
        assert_eq!(
            status(k.authorize(Access::Admin, "/v1/merges", Some("Bearer u1"))),
            200
        );
        assert_eq!(status(k.authorize(Access::Admin, "/v1/merges", None)), 401);
    }

    #[test]
    fn key_comparison() {
        assert!(same_key("abc", "abc"));
        assert!(!same_key("abc", "abd"));
        assert!(!same_key("abc", "ab"));
        assert!(!same_key("", "a"));
    }
}
