//! The OpenAPI document, generated from the route and type annotations
//! (utoipa). `openapi/openapi.json` at the workspace root is this document,
//! checked in; a test fails when they differ (regenerate with
//! `fusion openapi > openapi/openapi.json`).

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::error::{ErrorBody, ErrorResponse};
use crate::evaluations::{
    Degraded, EvaluationInfo, Outcome, RunRecord, RunState, TaskScore, Trigger,
};
use crate::merges::{MergeInfo, MergeState};
use crate::registry::routed::{RouterSource, RoutersInfo};
use crate::routes;
use crate::routes::sse::{
    ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChunk, CompletionChunkChoice,
};
use crate::searches::{SearchInfo, SearchPoint, SearchState};
use crate::store::DeleteStatus;

/// The gateway's API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fusion Gateway",
        description = "OpenAI-compatible serving of merged fine-tuned checkpoints. A request's `model` names \
            a checkpoint, a preset, a compact merge such as `ties_merging(math,code;density=0.2)` \
            (or a routed merge such as `we_moe(math,code;steps=100)`) or \
            `merge-<id>`; the gateway merges on demand and keeps merged weights in a byte-bounded LRU. \
            Responses carry `x-merge-id` and `x-merge-cache: hit | miss | joined`."
    ),
    paths(
        routes::chat::chat_completions,
        routes::completions::completions,
        routes::embeddings::embeddings,
        routes::classifications::classifications,
        routes::models::list_models,
        routes::merges::create_merge,
        routes::merges::list_merges,
        routes::merges::get_merge,
        routes::merges::delete_merge,
        routes::evaluations::list_evaluations,
        routes::evaluations::run_evaluation,
        routes::searches::start_search,
        routes::searches::list_searches,
        routes::searches::get_search,
        routes::health::live,
        routes::health::ready,
        routes::health::metrics,
    ),
    components(schemas(
        ErrorResponse, ErrorBody, MergeInfo, MergeState, DeleteStatus,
        RoutersInfo, RouterSource,
        EvaluationInfo, RunRecord, TaskScore, Outcome, Trigger, RunState, Degraded,
        SearchInfo, SearchState, SearchPoint,
        ChatCompletionChunk, ChatChunkChoice, ChatDelta, CompletionChunk, CompletionChunkChoice,
    )),
    modifiers(&BearerKeys),
    tags(
        (name = "openai", description = "OpenAI-compatible routes"),
        (name = "merges", description = "Merges: create or warm, list, status, evict (admin key)"),
        (name = "evaluations", description = "Scheduled evaluations: last results, run now (admin key)"),
        (name = "searches", description = "Searches of a merge's parameters on a pool, the best registered as a preset (admin key)"),
        (name = "health", description = "Health and metrics"),
    )
)]
pub struct ApiDoc;

/// Declares the two bearer schemes (`api_key`, `admin_key`).
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("api_key", "A key of `server.api_keys` (or an admin key)"),
            ("admin_key", "A key of `server.admin_keys`"),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON with a final newline (the checked-in form).
pub fn json() -> String {
    let mut s = document()
        .to_pretty_json()
        .expect("the document serializes");
    s.push('\n');
    s
}
