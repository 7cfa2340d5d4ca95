//! `POST /v1/classifications` (extension): an image model, or any merge of
//! image checkpoints named in `model`, classifies images with a task's
//! frozen head ([`crate::heads`]), FusionBench's protocol: the label is
//! the argmax of `s · cos(e, w_c)` over the task's classes, and the
//! probabilities its softmax.

use actix_web::{post, web, HttpResponse};
use merger::spec::MergeSpec;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::embeddings::EmbeddingInput;
use super::model_headers;
use crate::error::{ErrorResponse, GatewayError, Result};
use crate::serving;
use crate::state::AppState;

/// A classification request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassificationRequest {
    /// An image checkpoint, a preset, a compact merge or `merge-<id>`.
    #[serde(default)]
    pub model: Option<String>,
    /// A structured merge spec; when present `model` is ignored.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub merge: Option<MergeSpec>,
    /// An image_classification task of a configured task pool: `mnist`, or
    /// `<taskpool>/mnist`.
    pub task: String,
    /// One image or a list of images, as data URLs
    /// (`data:image/png;base64,...` or `image/jpeg`).
    #[schema(value_type = Object)]
    pub input: EmbeddingInput,
}

/// The classes of the images.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClassificationResponse {
    /// `list`.
    pub object: String,
    /// One answer per image, in order.
    pub data: Vec<Classification>,
    /// The canonical model name.
    pub model: String,
    /// The task, as `<taskpool>/<task>`.
    pub task: String,
    /// The task's class names.
    pub classes: Vec<String>,
}

/// One image's class.
#[derive(Debug, Serialize, ToSchema)]
pub struct Classification {
    /// `classification`.
    pub object: String,
    /// Position of the input.
    pub index: usize,
    /// The predicted label (index into `classes`).
    pub label: usize,
    /// Its class name.
    pub class: String,
    /// Probability of each class, in `classes` order.
    pub probabilities: Vec<f64>,
}

/// Image classification with a task's frozen head (extension).
#[utoipa::path(
    post,
    path = "/v1/classifications",
    tag = "openai",
    request_body = ClassificationRequest,
    responses(
        (status = 200, description = "Labels and class probabilities", body = ClassificationResponse),
        (status = 400, description = "Malformed request, not an image model, a bad image", body = ErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "Unknown model or task", body = ErrorResponse),
        (status = 413, description = "Over a limit", body = ErrorResponse),
        (status = 429, description = "Queue full", body = ErrorResponse),
        (status = 503, description = "Merge still running", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
#[post("/v1/classifications")]
pub async fn classifications(
    state: web::Data<AppState>,
    body: web::Json<ClassificationRequest>,
) -> Result<HttpResponse> {
    let req = body.into_inner();
    let images = req.input.into_list("images")?;
    let task = crate::heads::find(&state.config, &req.task)?;
    let handle = state
        .models
        .image_model(req.model.as_deref(), req.merge, "/v1/classifications")
        .await?;
    let dim = handle.served.engine.dimension();
    if dim != task.head.dim() {
        return Err(GatewayError::bad_param(
            "task",
            format!(
                "task `{}`'s head reads {}-dimensional embeddings; model `{}` gives {dim}",
                task.name,
                task.head.dim(),
                handle.name()
            ),
        ));
    }
    let vectors = serving::embed_images(&state, &handle, images).await?;
    let data = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let probabilities = task.head.probabilities(v);
            let label = evaluator::metrics::argmax(&probabilities).unwrap_or(0);
            Classification {
                object: "classification".into(),
                index,
                label,
                class: task.classes[label].clone(),
                probabilities,
            }
        })
        .collect();
    let mut res = HttpResponse::Ok();
    model_headers(&mut res, &handle);
    Ok(res.json(ClassificationResponse {
        object: "list".into(),
        data,
        model: handle.name().to_string(),
        task: task.name,
        classes: task.classes,
    }))
}
