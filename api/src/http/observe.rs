//! What every request leaves behind: a request id (taken from a sane incoming `x-request-id`,
//! else generated) on every log line of the request and in the response's `x-request-id`, and
//! its count and latency in the process's metrics, by route pattern.
//! Also the `/metrics` endpoint.

use std::time::Instant;

use poem::http::{header, HeaderValue, StatusCode};
use poem::web::Data;
use poem::{handler, Endpoint, IntoResponse, Request, Response};
use tracing::Instrument;

use crate::service::AppState;

pub const REQUEST_ID: &str = "x-request-id";

/// The id of the request being served, for handlers that want to repeat it.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Wraps every route: request id, span, metrics.
pub async fn around<E: Endpoint>(
    endpoint: E,
    mut request: Request,
    state: AppState,
) -> poem::Result<Response> {
    let started = Instant::now();
    let id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|value| acceptable_id(value))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let method = request.method().as_str().to_owned();
    let route = route_label(request.uri().path());
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, %method, route);
    let result = endpoint.call(request).instrument(span.clone()).await;
    let mut response = match result {
        Ok(response) => response.into_response(),
        Err(error) => error.into_response(),
    };
    let status = response.status().as_u16();
    state
        .metrics
        .http_request(route, &method, status, started.elapsed());
    let _entered = span.enter();
    if status >= 500 {
        tracing::warn!(
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request failed"
        );
    } else {
        tracing::debug!(
            status,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "request"
        );
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    Ok(response)
}

/// An incoming id is kept when it is short and plain (it ends up in logs and headers).
fn acceptable_id(value: &str) -> bool {
    (1..=128).contains(&value.len())
        && value
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"-_.:".contains(&byte))
}

/// The route pattern a path is served by, so that labels stay few: ids never appear in them.
fn route_label(path: &str) -> &'static str {
    const ROUTES: &[&str] = &[
        "/v1/batch",
        "/v1/b",
        "/v1/import",
        "/v1/identify",
        "/v1/i",
        "/v1/track",
        "/v1/t",
        "/v1/page",
        "/v1/p",
        "/v1/screen",
        "/v1/s",
        "/v1/group",
        "/v1/g",
        "/v1/alias",
        "/v1/a",
        "/graphql",
        "/graphql/ws",
        "/healthz",
        "/readyz",
        "/metrics",
        "/unsubscribe",
        "/activate",
        "/reset-password",
    ];
    let trimmed = match path.trim_end_matches('/') {
        "" => "/",
        trimmed => trimmed,
    };
    if let Some(route) = ROUTES.iter().find(|route| **route == trimmed) {
        return route;
    }
    if trimmed.starts_with("/graphql/assets/") {
        return "/graphql/assets/:file";
    }
    "other"
}

/// `GET /metrics`: the Prometheus text format. With `CDP_METRICS_TOKEN` set, only for
/// `Authorization: Bearer <token>`.
#[handler]
pub async fn metrics(request: &Request, Data(state): Data<&AppState>) -> Response {
    if let Some(token) = &state.config.metrics_token {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        let matches = presented.is_some_and(|presented| {
            crate::crypto::constant_time_eq(presented.as_bytes(), token.as_bytes())
        });
        if !matches {
            return (StatusCode::UNAUTHORIZED, "metrics need the bearer token").into_response();
        }
    }
    crate::service::observe::refresh_gauges(state).await;
    Response::builder()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_are_patterns() {
        assert_eq!(route_label("/v1/batch"), "/v1/batch");
        assert_eq!(route_label("/graphql/"), "/graphql");
        assert_eq!(
            route_label("/graphql/assets/graphiql.js"),
            "/graphql/assets/:file"
        );
        assert_eq!(route_label("/v1/whatever-a-scanner-tries"), "other");
        assert_eq!(route_label("/"), "other");
    }

    #[test]
    fn only_plain_short_request_ids_are_kept() {
        assert!(acceptable_id("3f2c-11aa_b.c:d"));
        assert!(!acceptable_id(""));
        assert!(!acceptable_id("a b"));
        assert!(!acceptable_id("line\nbreak"));
        assert!(!acceptable_id(&"x".repeat(129)));
    }
}
