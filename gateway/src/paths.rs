//! The path of every route, as the router matches it: the routes, the
//! access classes of [`crate::auth`] and the server's own mounts name them
//! from here.

/// Chat completions.
pub const CHAT: &str = "/v1/chat/completions";
/// Text completions.
pub const COMPLETIONS: &str = "/v1/completions";
/// Embeddings.
pub const EMBEDDINGS: &str = "/v1/embeddings";
/// Image classification with a task's head (extension).
pub const CLASSIFICATIONS: &str = "/v1/classifications";
/// Models list.
pub const MODELS: &str = "/v1/models";
/// Merges collection.
pub const MERGES: &str = "/v1/merges";
/// One merge.
pub const MERGE: &str = "/v1/merges/{id}";
/// Evaluations: list, run now.
pub const EVALUATIONS: &str = "/v1/evaluations";
/// Searches: list, start.
pub const SEARCHES: &str = "/v1/searches";
/// One search.
pub const SEARCH: &str = "/v1/searches/{id}";
/// Liveness.
pub const LIVE: &str = "/health/live";
/// Readiness.
pub const READY: &str = "/health/ready";
/// Prometheus exposition.
pub const METRICS: &str = "/metrics";
/// The OpenAPI document.
pub const OPENAPI: &str = "/openapi.json";
/// Redirect to the Swagger UI.
pub const DOCS: &str = "/docs";
/// The Swagger UI's files.
pub const DOCS_FILES: &str = "/docs/{_:.*}";
