//! Request timeouts (`CDP_REQUEST_TIMEOUT_SECS`): a request that takes longer is stopped and
//! answered 503 with a body its clients read (a GraphQL error with INTERNAL on `/graphql`, the
//! `{"code","message"}` shape elsewhere). `/graphql/ws` is not wrapped: a socket lives as long as
//! its credentials.
//!
//! Guarantees: the request's work is dropped at the deadline (an open transaction rolls back);
//! work that committed before it stays committed, so a timed-out mutation may have taken effect
//! and a retried collection request is stored once (idempotent by `messageId`).

use std::time::Duration;

use poem::http::{header, StatusCode};
use poem::{Endpoint, IntoResponse, Middleware, Request, Response, Result};
use serde_json::json;

/// Which body a timed-out request gets.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// `{"errors": [{"message", "extensions": {"code": "INTERNAL"}}]}`, as GraphQL clients read.
    Graphql,
    /// `{"success": false, "code": "timeout", "message"}`, as the collection clients read.
    Plain,
}

/// The middleware; a zero limit turns it off.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimeout {
    pub limit: Duration,
    pub shape: Shape,
}

impl<E: Endpoint> Middleware<E> for RequestTimeout {
    type Output = TimeoutEndpoint<E>;

    fn transform(&self, inner: E) -> Self::Output {
        TimeoutEndpoint {
            inner,
            limit: self.limit,
            shape: self.shape,
        }
    }
}

pub struct TimeoutEndpoint<E> {
    inner: E,
    limit: Duration,
    shape: Shape,
}

impl<E: Endpoint> Endpoint for TimeoutEndpoint<E> {
    type Output = Response;

    async fn call(&self, request: Request) -> Result<Self::Output> {
        if self.limit.is_zero() {
            return self
                .inner
                .call(request)
                .await
                .map(IntoResponse::into_response);
        }
        let path = request.uri().path().to_owned();
        match tokio::time::timeout(self.limit, self.inner.call(request)).await {
            Ok(outcome) => outcome.map(IntoResponse::into_response),
            Err(_) => {
                tracing::warn!(%path, limit = ?self.limit, "request timed out");
                Ok(timed_out(self.limit, self.shape))
            }
        }
    }
}

fn timed_out(limit: Duration, shape: Shape) -> Response {
    let message = format!(
        "the request took longer than {} and was stopped (CDP_REQUEST_TIMEOUT_SECS)",
        describe(limit)
    );
    let body = match shape {
        Shape::Graphql => {
            json!({"errors": [{"message": message, "extensions": {"code": "INTERNAL"}}]})
        }
        Shape::Plain => json!({"success": false, "code": "timeout", "message": message}),
    };
    Response::builder()
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
}

fn describe(limit: Duration) -> String {
    if limit.subsec_millis() == 0 {
        format!("{} s", limit.as_secs())
    } else {
        format!("{} ms", limit.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use poem::{endpoint::make, EndpointExt};

    #[tokio::test]
    async fn a_request_past_the_limit_is_answered_503_in_the_shape_its_clients_read() {
        for (shape, code) in [
            (Shape::Plain, "/code"),
            (Shape::Graphql, "/errors/0/extensions/code"),
        ] {
            let never = make(|_| futures::future::pending::<&'static str>());
            let endpoint = never.with(RequestTimeout {
                limit: Duration::from_millis(10),
                shape,
            });
            let response = endpoint.call(Request::builder().finish()).await.unwrap();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            let body: serde_json::Value =
                serde_json::from_slice(&response.into_body().into_vec().await.unwrap()).unwrap();
            let expected = match shape {
                Shape::Plain => "timeout",
                Shape::Graphql => "INTERNAL",
            };
            assert_eq!(body.pointer(code), Some(&json!(expected)), "{body}");
        }
    }

    #[tokio::test]
    async fn a_zero_limit_is_no_limit() {
        let endpoint = make(|_| async { "done" }).with(RequestTimeout {
            limit: Duration::ZERO,
            shape: Shape::Plain,
        });
        let response = endpoint.call(Request::builder().finish()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}
