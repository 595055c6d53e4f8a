//! What every service's API document shares: the `{"detail"}` error body,
//! the list parameters, and the documentation endpoints.
//!
//! Each service declares its routes through `utoipa_axum`'s
//! `OpenApiRouter` with `#[utoipa::path]` handlers, so the router and the
//! document are made from the same annotations: a route cannot be served
//! without being documented. `serve::finish_router` adds `GET
//! /openapi.json` (OpenAPI 3.1) and `GET /docs` (Swagger UI, its assets
//! inside the binary).

use serde::{Deserialize, Serialize};
use utoipa::openapi::OpenApi;
use utoipa::{IntoParams, ToSchema};

/// Every error answer: `{"detail": "..."}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub detail: String,
}

/// `limit` and `after_id` of a list (`page::Page`).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Most items in the answer (default 100).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
    /// Only items whose id is above this one: the last id of the previous
    /// page (the `Link: rel="next"` header gives it).
    #[param(minimum = 0)]
    pub after_id: Option<i64>,
}

/// The documentation routes for `api`: `/openapi.json` and `/docs`.
pub fn docs(api: OpenApi) -> axum::Router {
    utoipa_swagger_ui::SwaggerUi::new("/docs")
        .url("/openapi.json", api)
        .into()
}
