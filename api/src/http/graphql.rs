//! `POST /graphql`: reads the body within its limit, counts its operations against the client
//! address's rate, authenticates the bearer credentials, counts the operations against the
//! tenant's rate, then hands them to the GraphQL layer. Also the gate in front of `/graphql/ws`,
//! which counts each connect against the client address's rate.
//!
//! Guarantees: a request over a rate is answered 429 with `Retry-After` and RATE_LIMITED before
//! anything runs; the address is counted before the credentials cost a database round trip.

use std::sync::Arc;

use poem::http::{header, StatusCode};
use poem::web::Data;
use poem::{handler, Body, Endpoint, IntoResponse, Request, Response};

use super::client;
use crate::graphql::transport::{
    error_outcome, execute, parse_operations, rate_limited_outcome, HttpOutcome,
};
use crate::graphql::{field_limits, CdpSchema, RequestContext};
use crate::service::{self, AppState, RequestMeta, ServiceError};

fn respond(outcome: HttpOutcome) -> Response {
    let mut response = Response::builder()
        .status(StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(seconds) = outcome.retry_after {
        response = response.header(header::RETRY_AFTER, seconds);
    }
    response.body(outcome.body)
}

/// The facts about a request that the audit log records: the client address, resolved through
/// the trusted proxies.
pub fn request_meta(request: &Request, state: &AppState) -> RequestMeta {
    RequestMeta {
        ip: client::client_ip(request, &state.config.abuse.trusted_proxies)
            .map(|address| address.to_string()),
    }
}

#[handler]
pub async fn post(
    request: &Request,
    body: Body,
    Data(state): Data<&AppState>,
    Data(schema): Data<&CdpSchema>,
) -> Response {
    let client_ip = client::client_ip(request, &state.config.abuse.trusted_proxies);
    // One operation's worth before the body is read, so that a flood of bodies that are too
    // large or no GraphQL at all is limited too; the rest of a batch once it is known.
    if let Some(address) = client_ip {
        if let Err(retry) = state.request_limits.graphql_from_ip(address, 1) {
            return respond(rate_limited_outcome(retry.seconds));
        }
    }
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
    let operations = match parse_operations(
        &bytes,
        state.config.graphql.max_batch,
        field_limits(&state.config.abuse),
    ) {
        Ok(operations) => operations,
        Err(outcome) => return respond(outcome),
    };
    if let (Some(address), true) = (client_ip, operations.len() > 1) {
        if let Err(retry) = state
            .request_limits
            .graphql_from_ip(address, operations.len() - 1)
        {
            return respond(rate_limited_outcome(retry.seconds));
        }
    }
    let mut context = RequestContext {
        principal: None,
        auth_error: None,
        meta: RequestMeta {
            ip: client_ip.map(|address| address.to_string()),
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
    if let Some(principal) = &context.principal {
        if let Err(retry) = state
            .request_limits
            .graphql_of_tenant(principal.tenant_id, operations.len())
        {
            return respond(rate_limited_outcome(retry.seconds));
        }
    }
    respond(execute(schema, context, operations, &state.metrics).await)
}

/// In front of `/graphql/ws`: counts the connect against the client address's rate (429 with
/// `Retry-After` before the upgrade), and leaves the request's [`RequestMeta`] for the socket.
pub async fn websocket_gate<E: Endpoint>(
    endpoint: Arc<E>,
    mut request: Request,
    state: AppState,
) -> poem::Result<Response> {
    let client_ip = client::client_ip(&request, &state.config.abuse.trusted_proxies);
    if let Some(address) = client_ip {
        if let Err(retry) = state.request_limits.graphql_from_ip(address, 1) {
            return Ok(respond(rate_limited_outcome(retry.seconds)));
        }
    }
    let meta = request_meta(&request, &state);
    request.extensions_mut().insert(meta);
    endpoint
        .call(request)
        .await
        .map(IntoResponse::into_response)
}
