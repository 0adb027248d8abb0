//! The demo page and what it loads: the page itself, the favicon and the example images.

use super::{ApiError, Shared};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};

pub(super) async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        FAVICON_SVG,
    )
        .into_response()
}

/// Three bars of falling height: streams leaving the stack at different layers.
const FAVICON_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="6" fill="#1d3557"/><rect x="6" y="6" width="5" height="20" rx="1" fill="#e9c46a"/><rect x="13.5" y="12" width="5" height="14" rx="1" fill="#2a9d8f"/><rect x="21" y="18" width="5" height="8" rx="1" fill="#8ecae6"/></svg>"##;

pub(super) async fn index() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

pub(super) async fn examples_json(State(st): State<Shared>) -> Response {
    match std::fs::read(st.cfg.examples_dir.join("examples.json")) {
        Ok(b) => ([(header::CONTENT_TYPE, "application/json")], b).into_response(),
        Err(_) => ApiError::new(StatusCode::NOT_FOUND, "no examples").into_response(),
    }
}

pub(super) async fn example_png(
    State(st): State<Shared>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Response {
    let stem = name.strip_suffix(".png").unwrap_or("");
    let safe = !stem.is_empty()
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !safe {
        return ApiError::new(StatusCode::NOT_FOUND, "no such example").into_response();
    }
    match std::fs::read(st.cfg.examples_dir.join(&name)) {
        Ok(b) => ([(header::CONTENT_TYPE, "image/png")], b).into_response(),
        Err(_) => ApiError::new(StatusCode::NOT_FOUND, "no such example").into_response(),
    }
}
