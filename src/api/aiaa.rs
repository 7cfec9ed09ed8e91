//! AIAA v1 routes: model list, deepgrow / inference, and segmentation (refused for deepgrow models).

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::click::{click, ClickBody, Named, ReplyKind};
use super::multipart::{drain, UploadForm};
use super::SharedState;
use crate::annotate::Annotation;
use crate::error::ApiError;

#[derive(Debug, Deserialize)]
pub struct ModelsQuery {
    model: Option<String>,
    label: Option<String>,
    #[serde(rename = "type")]
    model_type: Option<String>,
}

/// `GET /v1/models`: all models (filtered by `label` / `type`), or one object for `?model=`.
pub async fn list_models(
    State(state): State<SharedState>,
    Query(query): Query<ModelsQuery>,
) -> Response {
    if let Some(name) = query.model.as_deref().filter(|n| !n.is_empty()) {
        return match state.registry.get(name) {
            Some(model) => Json(&model.info).into_response(),
            None => ApiError::UnknownModel(name.to_owned()).into_response(),
        };
    }
    let infos: Vec<_> = state
        .registry
        .models()
        .iter()
        .map(|m| &m.info)
        .filter(|info| {
            query
                .model_type
                .as_deref()
                .is_none_or(|t| t.is_empty() || info.model_type.eq_ignore_ascii_case(t))
        })
        .filter(|info| {
            query.label.as_deref().is_none_or(|label| {
                label.is_empty() || info.labels.iter().any(|l| l.eq_ignore_ascii_case(label))
            })
        })
        .collect();
    Json(infos).into_response()
}

#[derive(Debug, Deserialize)]
pub struct InferQuery {
    model: Option<String>,
    session_id: Option<String>,
    output: Option<String>,
}

/// `POST /v1/deepgrow` and `POST /v1/inference` on a deepgrow model: one click, one mask.
pub async fn deepgrow(
    State(state): State<SharedState>,
    Query(query): Query<InferQuery>,
    request: Request,
) -> Result<Response, ApiError> {
    let form = UploadForm::from_request(request, state.policy.max_upload_bytes).await?;
    let mut body = ClickBody::Form(form);
    let result = deepgrow_click(&state, &query, &mut body).await;
    if result.is_err() {
        // The body is read before an error is answered (see `drain`).
        body.drain().await;
    }
    result
}

async fn deepgrow_click(
    state: &SharedState,
    query: &InferQuery,
    body: &mut ClickBody,
) -> Result<Response, ApiError> {
    let model = state.model(query.model.as_deref())?;
    let kind = ReplyKind::parse(query.output.as_deref()).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "output '{}' is not supported (use image or json)",
            query.output.as_deref().unwrap_or_default()
        ))
    })?;
    let Annotation {
        file,
        file_name,
        params,
    } = click(
        state,
        model,
        Named {
            session_id: query.session_id.as_deref(),
            series: None,
        },
        body,
    )
    .await?
    .annotation;
    kind.respond(&params, file_name, file)
}

/// `POST /v1/segmentation`: this server serves only deepgrow models, which need clicks.
pub async fn segmentation(
    State(state): State<SharedState>,
    Query(query): Query<InferQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    drain(body, state.policy.max_upload_bytes).await;
    let model = state.model(query.model.as_deref())?;
    Err(ApiError::WrongModelType(format!(
        "model '{}' is a {} model: it needs foreground/background clicks; call /v1/deepgrow or /v1/inference instead of /v1/segmentation",
        model.info.name, model.info.model_type
    )))
}
