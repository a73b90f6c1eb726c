//! GraphQL over HTTP and WebSocket: turning a request body into executed operations, with the
//! batching limit and the contract's error shape, and the WebSocket endpoint that authenticates
//! in `connection_init`.

use async_graphql::http::{WebSocketProtocols, ALL_WEBSOCKET_PROTOCOLS};
use async_graphql::{BatchRequest, BatchResponse, Data};
use async_graphql_poem::GraphQLWebSocket;
use poem::web::websocket::WebSocket;
use poem::{Endpoint, FromRequest, IntoResponse, Request, Response, Result};

use super::{ensure_error_codes, error_response, CdpSchema, RequestContext};
use crate::service::{self, AppState, ServiceError};

/// The outcome of an HTTP GraphQL request: a status and a JSON body.
pub struct HttpOutcome {
    pub status: u16,
    pub body: Vec<u8>,
}

fn json_outcome(status: u16, response: &impl serde::Serialize) -> HttpOutcome {
    HttpOutcome {
        status,
        body: serde_json::to_vec(response).unwrap_or_else(|_| b"{}".to_vec()),
    }
}

/// A response with one error and the contract's code, for failures before execution.
pub fn error_outcome(status: u16, message: &str, code: &str) -> HttpOutcome {
    json_outcome(status, &error_response(message, code))
}

/// Executes a JSON body (one operation or a batch) for the given request context.
pub async fn execute_json(
    schema: &CdpSchema,
    context: RequestContext,
    body: &[u8],
    max_batch: usize,
) -> HttpOutcome {
    let batch: BatchRequest = match serde_json::from_slice(body) {
        Ok(batch) => batch,
        Err(error) => {
            return error_outcome(
                400,
                &format!("the body is not a GraphQL request: {error}"),
                "BAD_USER_INPUT",
            )
        }
    };
    let size = batch.iter().count();
    if size == 0 || size > max_batch {
        return error_outcome(
            400,
            &format!("a batch holds 1 to {max_batch} operations; this one holds {size}"),
            "BAD_USER_INPUT",
        );
    }
    match schema.execute_batch(batch.data(context)).await {
        BatchResponse::Single(response) => json_outcome(200, &ensure_error_codes(response)),
        BatchResponse::Batch(responses) => {
            let responses: Vec<_> = responses.into_iter().map(ensure_error_codes).collect();
            json_outcome(200, &responses)
        }
    }
}

/// Reads the credentials of `connection_init` (`{"authorization": "Bearer …"}`, any case of the
/// key) and authenticates them. A socket without valid credentials is closed.
async fn authenticate_socket(
    state: AppState,
    payload: serde_json::Value,
) -> async_graphql::Result<Data> {
    let header = payload
        .as_object()
        .and_then(|object| {
            object
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case("authorization"))
                .and_then(|(_, value)| value.as_str())
        })
        .ok_or_else(|| {
            async_graphql::Error::new(
                "connection_init must carry {\"authorization\": \"Bearer <token>\"}",
            )
        })?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| async_graphql::Error::new("the authorization must be a Bearer token"))?;
    let principal = service::auth::authenticate_bearer(&state, token)
        .await
        .map_err(|error| match error {
            ServiceError::Unexpected(inner) => {
                tracing::error!(error = ?inner, "websocket authentication failed");
                async_graphql::Error::new("internal error")
            }
            other => async_graphql::Error::new(other.to_string()),
        })?;
    let mut data = Data::default();
    data.insert(RequestContext {
        principal: Some(principal),
        auth_error: None,
        meta: Default::default(),
    });
    Ok(data)
}

/// The `/graphql/ws` endpoint: `graphql-transport-ws` and the legacy `graphql-ws` protocol.
pub struct SubscriptionEndpoint {
    pub schema: CdpSchema,
    pub state: AppState,
}

impl Endpoint for SubscriptionEndpoint {
    type Output = Response;

    async fn call(&self, request: Request) -> Result<Self::Output> {
        let (request, mut body) = request.split();
        let websocket = WebSocket::from_request(&request, &mut body).await?;
        let protocol = request
            .headers()
            .get(poem::http::header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|value| value.to_str().ok())
            .and_then(|protocols| {
                protocols
                    .split(',')
                    .find_map(|protocol| protocol.trim().parse::<WebSocketProtocols>().ok())
            })
            .ok_or_else(|| poem::Error::from_status(poem::http::StatusCode::BAD_REQUEST))?;
        let schema = self.schema.clone();
        let state = self.state.clone();
        Ok(websocket
            .protocols(ALL_WEBSOCKET_PROTOCOLS)
            .on_upgrade(move |stream| {
                GraphQLWebSocket::new(
                    stream,
                    schema,
                    async_graphql_poem::GraphQLProtocol(protocol),
                )
                .on_connection_init(move |payload| authenticate_socket(state, payload))
                .serve()
            })
            .into_response())
    }
}
