//! `POST /graphql`: reads the body within its limit, authenticates the bearer credentials, then
//! hands the operations to the GraphQL layer.

use poem::http::{header, StatusCode};
use poem::web::Data;
use poem::{handler, Body, Request, Response};

use crate::graphql::transport::{error_outcome, execute_json, HttpOutcome};
use crate::graphql::{CdpSchema, RequestContext};
use crate::service::{self, AppState, RequestMeta, ServiceError};

fn respond(outcome: HttpOutcome) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(outcome.body)
}

/// The client address, as the audit log records it.
pub fn client_ip(request: &Request) -> Option<String> {
    request
        .remote_addr()
        .as_socket_addr()
        .map(|address| address.ip().to_string())
}

#[handler]
pub async fn post(
    request: &Request,
    body: Body,
    Data(state): Data<&AppState>,
    Data(schema): Data<&CdpSchema>,
) -> Response {
    let limit = state.config.graphql.max_body_bytes;
    let bytes = match body.into_bytes_limit(limit).await {
        Ok(bytes) => bytes,
        Err(poem::error::ReadBodyError::PayloadTooLarge) => {
            return respond(error_outcome(
                413,
                &format!("the request body is larger than {limit} bytes"),
                "BAD_USER_INPUT",
            ))
        }
        Err(error) => {
            return respond(error_outcome(
                400,
                &format!("cannot read the request body: {error}"),
                "BAD_USER_INPUT",
            ))
        }
    };
    let mut context = RequestContext {
        principal: None,
        auth_error: None,
        meta: RequestMeta {
            ip: client_ip(request),
        },
    };
    if let Some(value) = request.headers().get(header::AUTHORIZATION) {
        let token = value.to_str().ok().and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
        });
        match token {
            None => {
                context.auth_error =
                    Some("the Authorization header must be `Bearer <token>`".to_owned())
            }
            Some(token) => match service::auth::authenticate_bearer(state, token).await {
                Ok(principal) => context.principal = Some(principal),
                Err(ServiceError::Unexpected(error)) => {
                    let reference = uuid::Uuid::new_v4();
                    tracing::error!(%reference, error = ?error, "authentication failed");
                    return respond(error_outcome(
                        500,
                        &format!("internal error (reference {reference})"),
                        "INTERNAL",
                    ));
                }
                Err(other) => context.auth_error = Some(other.to_string()),
            },
        }
    }
    respond(execute_json(schema, context, &bytes, state.config.graphql.max_batch).await)
}
