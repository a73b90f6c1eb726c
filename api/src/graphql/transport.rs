//! GraphQL over HTTP and WebSocket: turning a request body into executed operations, with the
//! batching limit and the contract's error shape, and the WebSocket endpoint that authenticates
//! in `connection_init`, counts sockets against their tenant's limit, and closes a socket with
//! the `graphql-transport-ws` codes when its credentials are refused or expire.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_graphql::http::{WebSocketProtocols, WsMessage, ALL_WEBSOCKET_PROTOCOLS};
use async_graphql::{BatchRequest, BatchResponse, Data};
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use poem::web::websocket::{Message, WebSocket, WebSocketStream};
use poem::{Endpoint, FromRequest, IntoResponse, Request, Response, Result};

use super::subscriptions::SocketSession;
use super::{ensure_error_codes, error_response, mask_error_messages, CdpSchema, RequestContext};
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
    // Error messages may echo input (an address that did not parse): masked like data for a
    // principal without PII_READ.
    let masked = context
        .principal
        .as_ref()
        .is_some_and(|principal| !principal.has(domain::Permission::PiiRead));
    let finish = |response| {
        let response = ensure_error_codes(response);
        if masked {
            mask_error_messages(response)
        } else {
            response
        }
    };
    match schema.execute_batch(batch.data(context)).await {
        BatchResponse::Single(response) => json_outcome(200, &finish(response)),
        BatchResponse::Batch(responses) => {
            let responses: Vec<_> = responses.into_iter().map(finish).collect();
            json_outcome(200, &responses)
        }
    }
}

/// What `connection_init` decided, shared with the socket loop: the refusal to send as the close
/// reason, or when the accepted credentials expire.
#[derive(Debug, Default)]
struct Handshake {
    refused: Option<String>,
    expires_at: Option<DateTime<Utc>>,
}

type SharedHandshake = Arc<Mutex<Handshake>>;

fn lock(handshake: &SharedHandshake) -> std::sync::MutexGuard<'_, Handshake> {
    handshake.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Close codes of the `graphql-transport-ws` protocol, used for the legacy protocol as well.
mod close {
    /// `connection_init` refused: no, bad or revoked credentials, or the tenant's socket limit.
    pub const FORBIDDEN: u16 = 4403;
    /// A subscription before the handshake, or credentials that expired on an open socket.
    pub const UNAUTHORIZED: u16 = 4401;
    /// No `connection_init` in time.
    pub const INIT_TIMEOUT: u16 = 4408;
}

/// How long a socket may stay open without a successful `connection_init`.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the credentials of `connection_init` (`{"authorization": "Bearer …"}`, any case of the
/// key), authenticates them and counts the socket against its tenant's limit. A socket without
/// valid credentials is closed (4403).
async fn authenticate_socket(
    state: AppState,
    payload: serde_json::Value,
    handshake: SharedHandshake,
) -> async_graphql::Result<Data> {
    let outcome = accept_socket(&state, payload).await;
    if let Err(error) = &outcome {
        lock(&handshake).refused = Some(error.message.clone());
    }
    let (data, expires_at) = outcome?;
    lock(&handshake).expires_at = expires_at;
    Ok(data)
}

async fn accept_socket(
    state: &AppState,
    payload: serde_json::Value,
) -> async_graphql::Result<(Data, Option<DateTime<Utc>>)> {
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
    let principal = service::auth::authenticate_bearer(state, token)
        .await
        .map_err(|error| match error {
            ServiceError::Unexpected(inner) => {
                tracing::error!(error = ?inner, "websocket authentication failed");
                async_graphql::Error::new("internal error")
            }
            other => async_graphql::Error::new(other.to_string()),
        })?;
    let expires_at = service::auth::bearer_expiry(state, token);
    let permit = state
        .realtime
        .open_socket(principal.tenant_id)
        .map_err(|refused| async_graphql::Error::new(refused.to_string()))?;
    let mut data = Data::default();
    data.insert(RequestContext {
        principal: Some(principal),
        auth_error: None,
        meta: Default::default(),
    });
    data.insert(SocketSession::new(expires_at, permit));
    Ok((data, expires_at))
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
            .on_upgrade(move |socket| serve(socket, schema, state, protocol))
            .into_response())
    }
}

/// A close frame; the reason is cut to the 123 bytes a close frame can carry.
fn close_frame(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::close_with(code, &reason[..end])
}

/// Runs the protocol on one socket (async-graphql's state machine) and adds what it lacks: the
/// close codes of `graphql-transport-ws` for a refused or missing `connection_init` (4403, 4408)
/// and a subscription before it (4401), and closing the socket (4401) when the access token it
/// authenticated with expires.
async fn serve(
    socket: WebSocketStream,
    schema: CdpSchema,
    state: AppState,
    protocol: WebSocketProtocols,
) {
    let (mut sink, stream) = socket.split();
    let input = stream
        .take_while(|message| futures::future::ready(message.is_ok()))
        .filter_map(|message| {
            futures::future::ready(
                message
                    .ok()
                    .filter(|message| message.is_text() || message.is_binary())
                    .map(Message::into_bytes),
            )
        });
    let handshake = SharedHandshake::default();
    let on_init = {
        let handshake = handshake.clone();
        move |payload| authenticate_socket(state, payload, handshake)
    };
    let messages =
        async_graphql::http::WebSocket::new(schema, input, protocol).on_connection_init(on_init);
    futures::pin_mut!(messages);
    let mut acked = false;
    let mut deadline = tokio::time::Instant::now() + INIT_TIMEOUT;
    let mut deadline_code = close::INIT_TIMEOUT;
    let mut deadline_reason = "no connection_init in time";
    loop {
        let next = tokio::select! {
            next = messages.next() => next,
            () = tokio::time::sleep_until(deadline) => {
                let _ = sink.send(close_frame(deadline_code, deadline_reason)).await;
                break;
            }
        };
        let outgoing = match next {
            Some(WsMessage::Text(text)) => {
                if !acked && is_ack(&text) {
                    acked = true;
                    deadline_code = close::UNAUTHORIZED;
                    deadline_reason = "the access token expired";
                    deadline = match lock(&handshake).expires_at {
                        Some(at) => {
                            tokio::time::Instant::now()
                                + (at - Utc::now()).to_std().unwrap_or_default()
                        }
                        // An api key does not expire; a year stands for never.
                        None => tokio::time::Instant::now() + Duration::from_secs(365 * 86400),
                    };
                }
                Message::Text(text)
            }
            Some(WsMessage::Close(code, reason)) => {
                let refused = lock(&handshake).refused.clone();
                let frame = match refused {
                    Some(refused) => close_frame(close::FORBIDDEN, &refused),
                    None if !acked && code == 1011 => {
                        close_frame(close::UNAUTHORIZED, "Unauthorized")
                    }
                    None => close_frame(code, &reason),
                };
                let _ = sink.send(frame).await;
                break;
            }
            None => {
                // The legacy protocol ends the stream after its `connection_error` message.
                let refused = lock(&handshake).refused.clone();
                if let Some(refused) = refused {
                    let _ = sink.send(close_frame(close::FORBIDDEN, &refused)).await;
                }
                break;
            }
        };
        if sink.send(outgoing).await.is_err() {
            break;
        }
    }
}

fn is_ack(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text)
        .is_ok_and(|message| message["type"] == "connection_ack")
}
