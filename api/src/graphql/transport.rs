//! GraphQL over HTTP and WebSocket: turning a request body into executed operations, with the
//! batching limit and the contract's error shape, and the WebSocket endpoint that authenticates
//! in `connection_init`, counts sockets against their tenant's limit, and closes a socket with
//! the `graphql-transport-ws` codes when its credentials are refused or expire, when a message is
//! not one of the protocol's, or when a subscription id is already running.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_graphql::http::{WebSocketProtocols, WsMessage, ALL_WEBSOCKET_PROTOCOLS};
use async_graphql::parser::types::{DocumentOperations, OperationType};
use async_graphql::{
    BatchRequest, BatchResponse, Data, Executor as _, Response as GraphqlResponse,
};
use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use poem::web::websocket::{Message, WebSocket, WebSocketConfig, WebSocketStream};
use poem::{Endpoint, FromRequest, IntoResponse, Request, Response, Result};

use super::compiled::{Lookup, Plan, Plans};
use super::documents::ParsedDocuments;
use super::limits::FieldLimits;
use super::persisted::{PersistedQueries, Refusal, NOT_FOUND};
use super::subscriptions::SocketSession;
use super::{
    ensure_error_codes, error_response, mask_error_messages, rate_limited_error, CdpSchema,
    RequestContext,
};
use crate::service::{self, AppState, RequestMeta, ServiceError};

/// The outcome of an HTTP GraphQL request: a status, a JSON body, and for a refusal over a rate
/// limit the seconds to wait (`Retry-After`).
pub struct HttpOutcome {
    pub status: u16,
    pub body: Vec<u8>,
    pub retry_after: Option<u64>,
}

fn json_outcome(status: u16, response: &impl serde::Serialize) -> HttpOutcome {
    HttpOutcome {
        status,
        body: serde_json::to_vec(response).unwrap_or_else(|_| b"{}".to_vec()),
        retry_after: None,
    }
}

/// A response with one error and the contract's code, for failures before execution.
pub fn error_outcome(status: u16, message: &str, code: &str) -> HttpOutcome {
    json_outcome(status, &error_response(message, code))
}

/// 429 with RATE_LIMITED and `retryAfter`, and the same seconds for `Retry-After`.
pub fn rate_limited_outcome(retry_after_secs: u64) -> HttpOutcome {
    HttpOutcome {
        retry_after: Some(retry_after_secs),
        ..json_outcome(
            429,
            &GraphqlResponse::from_errors(vec![rate_limited_error(retry_after_secs)]),
        )
    }
}

/// The operations of one HTTP request (one, or a batch), read and checked against the batch
/// limits but not yet run.
pub struct Operations {
    batch: BatchRequest,
    /// The compiled plan of a single operation, if its document has one (ADR 0016); the
    /// document is then parsed only if the plan cannot answer.
    plan: Option<Arc<Plan>>,
}

impl Operations {
    /// How many operations the request holds; rate limits count each.
    pub fn len(&self) -> usize {
        self.batch.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every operation is a query (parsed here once; the schema reuses the parse). One
    /// that does not parse counts as not a query, and the schema answers its errors.
    pub fn only_queries(&mut self) -> bool {
        // Plans are compiled for queries only.
        if self.plan.is_some() {
            return true;
        }
        self.batch
            .iter_mut()
            .all(|request| operation_type(request) == Some(OperationType::Query))
    }
}

/// The type of the operation a request runs: its only one, or the one it names.
fn operation_type(request: &mut async_graphql::Request) -> Option<OperationType> {
    let name = request.operation_name.clone();
    let document = request.parsed_query().ok()?;
    match &document.operations {
        DocumentOperations::Single(operation) => Some(operation.node.ty),
        // Named operations come as `Multiple`, even alone; a document of one needs no name.
        DocumentOperations::Multiple(operations) => match name.as_deref() {
            Some(name) => operations.get(name),
            None if operations.len() == 1 => operations.values().next(),
            None => None,
        }
        .map(|operation| operation.node.ty),
    }
}

/// The transport's per-process caches: automatic persisted queries, parsed documents and their
/// compiled plans. Kept in the schema's data ([`super::build_schema`]), so the service's state
/// knows nothing of GraphQL.
#[derive(Debug)]
pub struct Caches {
    pub persisted: PersistedQueries,
    pub documents: ParsedDocuments,
    pub plans: Plans,
}

impl Caches {
    /// At most `persisted` queries and `documents` parsed documents (and as many plans) ; 0
    /// keeps none. Plans are compiled against `plans`, none without.
    pub fn new(
        persisted: usize,
        documents: usize,
        plans: Option<super::compiled::Limits>,
    ) -> Caches {
        Caches {
            persisted: PersistedQueries::new(persisted),
            documents: ParsedDocuments::new(documents),
            plans: Plans::new(documents, plans),
        }
    }

    /// The caches of `schema`; a schema built without them (only [`super::sdl`]'s) gets caches
    /// that keep nothing, which answer as a process that has seen nothing yet.
    pub fn of(schema: &CdpSchema) -> &Caches {
        static NONE: std::sync::LazyLock<Caches> =
            std::sync::LazyLock::new(|| Caches::new(0, 0, None));
        schema.data::<Caches>().unwrap_or(&NONE)
    }
}

/// Reads a JSON body (one operation or a batch) and checks the limits that span the batch: its
/// size, and the account mutations (`login` and its kin) over all its operations together, so
/// that batching cannot multiply them. Each operation's own limits are checked when it runs
/// (`limits.rs`), over HTTP and WebSocket alike.
pub fn parse_operations(
    body: &[u8],
    max_batch: usize,
    limits: FieldLimits,
    caches: &Caches,
) -> Result<Operations, HttpOutcome> {
    let batch: BatchRequest = serde_json::from_slice(body).map_err(|error| {
        error_outcome(
            400,
            &format!("the body is not a GraphQL request: {error}"),
            "BAD_USER_INPUT",
        )
    })?;
    check_operations(batch, max_batch, limits, caches)
}

/// Reads a GraphQL GET request (`query`, `operationName`, `variables`, `extensions` in the query
/// string): one query, never a mutation (405, as GraphQL over HTTP requires: a GET must be safe
/// to repeat and to cache).
pub fn parse_get(
    query_string: &str,
    limits: FieldLimits,
    caches: &Caches,
) -> Result<Operations, HttpOutcome> {
    let request = async_graphql::http::parse_query_string(query_string).map_err(|error| {
        error_outcome(
            400,
            &format!("the query string is not a GraphQL request: {error}"),
            "BAD_USER_INPUT",
        )
    })?;
    let mut operations = check_operations(BatchRequest::Single(request), 1, limits, caches)?;
    if let (BatchRequest::Single(request), None) = (&mut operations.batch, &operations.plan) {
        if matches!(
            operation_type(request),
            Some(OperationType::Mutation | OperationType::Subscription)
        ) {
            return Err(error_outcome(
                405,
                "only queries can be sent with GET; send mutations with POST",
                "BAD_USER_INPUT",
            ));
        }
    }
    Ok(operations)
}

/// The checks of [`parse_operations`] and [`parse_get`]: persisted queries resolved first (so
/// that the limits below see the real queries), then the batch's size and account mutations.
fn check_operations(
    mut batch: BatchRequest,
    max_batch: usize,
    limits: FieldLimits,
    caches: &Caches,
) -> Result<Operations, HttpOutcome> {
    for request in batch.iter_mut() {
        match caches.persisted.resolve(request) {
            Ok(()) => {}
            // The protocol's answer: 200 with this error, which clients take as "send the
            // query with the hash".
            Err(Refusal::NotFound) => {
                return Err(error_outcome(200, NOT_FOUND.0, NOT_FOUND.1));
            }
            Err(Refusal::Invalid(message)) => {
                return Err(error_outcome(400, &message, "BAD_USER_INPUT"));
            }
        }
    }
    let size = batch.iter().count();
    if size == 0 || size > max_batch {
        return Err(error_outcome(
            400,
            &format!("a batch holds 1 to {max_batch} operations; this one holds {size}"),
            "BAD_USER_INPUT",
        ));
    }
    // A single operation whose document has a plan needs no parse; any other is parsed once
    // here (or copied from an earlier parse of the same text) and kept in the request, so that
    // nothing after parses it again.
    let mut plan = None;
    match &mut batch {
        BatchRequest::Single(request) => match caches.plans.lookup(&request.query) {
            Lookup::Plan(found) => plan = Some(found),
            Lookup::NoPlan => caches.documents.fill(request),
            Lookup::Unknown => {
                caches.documents.fill(request);
                plan = caches.plans.learn(request);
            }
        },
        BatchRequest::Batch(requests) => {
            for request in requests {
                caches.documents.fill(request);
            }
        }
    }
    if size > 1 {
        let account_fields: usize = batch
            .iter_mut()
            .filter_map(|request| {
                request
                    .parsed_query()
                    .ok()
                    .map(|document| super::limits::account_fields(document, limits))
            })
            .sum();
        if account_fields > limits.max_account_fields {
            return Err(error_outcome(
                400,
                &format!(
                    "a batch may hold at most {} of {} over all its operations; this one holds {account_fields}",
                    limits.max_account_fields,
                    super::limits::ACCOUNT_FIELDS.join(", ")
                ),
                "BAD_USER_INPUT",
            ));
        }
    }
    Ok(Operations { batch, plan })
}

/// Runs the operations of one HTTP request for the given request context.
pub async fn execute(
    schema: &CdpSchema,
    context: RequestContext,
    mut operations: Operations,
    metrics: &crate::metrics::Metrics,
) -> HttpOutcome {
    if let (Some(plan), BatchRequest::Single(request)) = (&operations.plan, &mut operations.batch) {
        let started = std::time::Instant::now();
        if let Some(state) = schema.data::<AppState>() {
            if let Some(body) = super::compiled::answer(plan, request, &context, state).await {
                let name = request.operation_name.as_deref();
                metrics.graphql_operation(name, true, started.elapsed());
                metrics.graphql_compiled();
                return HttpOutcome {
                    status: 200,
                    body,
                    retry_after: None,
                };
            }
        }
        // The schema answers it: with the parse the plan spared.
        Caches::of(schema).documents.fill(request);
    }
    let names: Vec<Option<String>> = match &operations.batch {
        BatchRequest::Single(request) => vec![request.operation_name.clone()],
        BatchRequest::Batch(requests) => requests
            .iter()
            .map(|request| request.operation_name.clone())
            .collect(),
    };
    let started = std::time::Instant::now();
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
    let response = Admitted(schema.clone())
        .execute_batch(operations.batch.data(context))
        .await;
    // The operations of a batch run together: each counts the batch's time.
    let elapsed = started.elapsed();
    let oks: Vec<bool> = match &response {
        BatchResponse::Single(response) => vec![response.is_ok()],
        BatchResponse::Batch(responses) => responses.iter().map(|r| r.is_ok()).collect(),
    };
    for (name, ok) in names.iter().zip(oks) {
        metrics.graphql_operation(name.as_deref(), ok, elapsed);
    }
    match response {
        BatchResponse::Single(response) => json_outcome(200, &finish(response)),
        BatchResponse::Batch(responses) => {
            let responses: Vec<_> = responses.into_iter().map(finish).collect();
            json_outcome(200, &responses)
        }
    }
}

/// The schema as the transports run it: every operation passes [`super::limits::admit`], with
/// the checks [`super::build_schema`] keeps in the schema's data (a schema without them refuses
/// every operation, never runs one unchecked), before the schema sees it. Over a socket the
/// operation also counts against its tenant's rate.
#[derive(Clone)]
struct Admitted(CdpSchema);

impl Admitted {
    /// Checks `request`: the response to send instead of running it, if it is refused.
    fn refusal(
        &self,
        request: &mut async_graphql::Request,
        socket: Option<(&RequestContext, &AppState)>,
    ) -> Option<GraphqlResponse> {
        let Some(admission) = self.0.data::<super::limits::Admission>() else {
            return Some(error_response("internal error", "INTERNAL"));
        };
        super::limits::admit(request, admission, socket, &Caches::of(&self.0).documents)
            .err()
            .map(|refusal| GraphqlResponse::from_errors(vec![refusal]))
    }
}

impl async_graphql::Executor for Admitted {
    async fn execute(&self, mut request: async_graphql::Request) -> GraphqlResponse {
        match self.refusal(&mut request, None) {
            None => self.0.execute(request).await,
            Some(refused) => refused,
        }
    }

    /// The socket's operations (async-graphql's WebSocket runs every operation as a stream).
    fn execute_stream(
        &self,
        mut request: async_graphql::Request,
        session_data: Option<Arc<Data>>,
    ) -> futures::stream::BoxStream<'static, GraphqlResponse> {
        let context = session_data.as_deref().and_then(|data| {
            data.get(&std::any::TypeId::of::<RequestContext>())?
                .downcast_ref::<RequestContext>()
        });
        match self.refusal(&mut request, context.zip(self.0.data::<AppState>())) {
            None => self
                .0
                .execute_stream_with_session_data(request, session_data.unwrap_or_default()),
            Some(refused) => futures::stream::once(futures::future::ready(refused)).boxed(),
        }
    }
}

/// What `connection_init` decided, shared with the socket loop: the refusal to send as the close
/// code and reason, or when the accepted credentials expire.
#[derive(Debug, Default)]
struct Handshake {
    refused: Option<(u16, String)>,
    expires_at: Option<DateTime<Utc>>,
}

type SharedHandshake = Arc<Mutex<Handshake>>;

fn lock<T>(shared: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The subscription ids running on one socket, as the client's messages and the server's
/// `complete` messages tell them, and the violation that ended the client's input, if any.
/// async-graphql replaces a running subscription whose id comes again; `graphql-transport-ws`
/// requires closing the socket (4409) instead.
#[derive(Debug, Default)]
struct RunningSubscriptions {
    ids: HashSet<String>,
    violation: Option<(u16, String)>,
}

type SharedRunning = Arc<Mutex<RunningSubscriptions>>;

impl RunningSubscriptions {
    /// Whether a client message may go on to the protocol's state machine. Messages that do not
    /// parse are let through: the state machine refuses them (and `serve` closes with 4400).
    fn admit(&mut self, bytes: &[u8]) -> bool {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            return true;
        };
        let Some(id) = message["id"].as_str() else {
            return true;
        };
        match message["type"].as_str() {
            Some("subscribe" | "start") if !self.ids.insert(id.to_owned()) => {
                self.violation = Some((
                    close::DUPLICATE_ID,
                    format!("Subscriber for {id} already exists"),
                ));
                false
            }
            Some("complete" | "stop") => {
                self.ids.remove(id);
                true
            }
            _ => true,
        }
    }

    /// Forgets the id of a subscription the server completed: the client may use it again.
    fn completed_by_server(&mut self, text: &str) {
        // Only `complete` messages start so (async-graphql writes the tag first); the cheap test
        // spares parsing every `next` message.
        if !text.starts_with(r#"{"type":"complete""#) {
            return;
        }
        if let Ok(message) = serde_json::from_str::<serde_json::Value>(text) {
            if let Some(id) = message["id"].as_str() {
                self.ids.remove(id);
            }
        }
    }
}

/// Close codes of the `graphql-transport-ws` protocol, used for the legacy protocol as well.
mod close {
    /// `connection_init` refused: no, bad or revoked credentials, or the tenant's socket limit.
    pub const FORBIDDEN: u16 = 4403;
    /// A subscription before the handshake, or credentials that expired on an open socket.
    pub const UNAUTHORIZED: u16 = 4401;
    /// No `connection_init` in time.
    pub const INIT_TIMEOUT: u16 = 4408;
    /// `connection_init` over the tenant's request rate (the reason says when to retry), or a
    /// second `connection_init` (async-graphql's own refusal).
    pub const TOO_MANY_REQUESTS: u16 = 4429;
    /// A message larger than `CDP_WS_MAX_MESSAGE_BYTES` (RFC 6455: Message Too Big).
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// A frame that breaks the WebSocket protocol (RFC 6455: Protocol Error).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A message that is not JSON or not one of the protocol's. async-graphql's state machine
    /// closes with 1002 for it, which `serve` turns into this code.
    pub const BAD_MESSAGE: u16 = 4400;
    /// A `subscribe` with the id of a subscription still running.
    pub const DUPLICATE_ID: u16 = 4409;
    /// The server is shutting down (RFC 6455: Going Away).
    pub const GOING_AWAY: u16 = 1001;
}

/// How long a socket may stay open without a successful `connection_init`.
const INIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the credentials of `connection_init` (`{"authorization": "Bearer …"}`, any case of the
/// key), authenticates them and counts the socket against its tenant's limit and request rate.
/// A socket without valid credentials is closed (4403), one over the rate too (4429).
async fn authenticate_socket(
    state: AppState,
    meta: RequestMeta,
    payload: serde_json::Value,
    handshake: SharedHandshake,
) -> async_graphql::Result<Data> {
    let outcome = accept_socket(&state, meta, payload).await;
    let (data, expires_at) = match outcome {
        Ok(accepted) => accepted,
        Err((code, error)) => {
            lock(&handshake).refused = Some((code, error.message.clone()));
            return Err(error);
        }
    };
    lock(&handshake).expires_at = expires_at;
    Ok(data)
}

async fn accept_socket(
    state: &AppState,
    meta: RequestMeta,
    payload: serde_json::Value,
) -> Result<(Data, Option<DateTime<Utc>>), (u16, async_graphql::Error)> {
    let forbidden = |error: async_graphql::Error| (close::FORBIDDEN, error);
    let header = payload
        .as_object()
        .and_then(|object| {
            object
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case("authorization"))
                .and_then(|(_, value)| value.as_str())
        })
        .ok_or_else(|| {
            forbidden(async_graphql::Error::new(
                "connection_init must carry {\"authorization\": \"Bearer <token>\"}",
            ))
        })?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or_else(|| {
            forbidden(async_graphql::Error::new(
                "the authorization must be a Bearer token",
            ))
        })?;
    let principal = service::auth::authenticate_bearer(state, token)
        .await
        .map_err(|error| match error {
            ServiceError::Unexpected(inner) => {
                tracing::error!(error = ?inner, "websocket authentication failed");
                forbidden(async_graphql::Error::new("internal error"))
            }
            other => forbidden(async_graphql::Error::new(other.to_string())),
        })?;
    if let Err(retry) = state
        .request_limits
        .graphql_of_tenant(principal.tenant_id, 1)
    {
        return Err((
            close::TOO_MANY_REQUESTS,
            async_graphql::Error::new(format!("too many requests; retry in {} s", retry.seconds)),
        ));
    }
    let expires_at = service::auth::bearer_expiry(state, token);
    let permit = state
        .realtime
        .open_socket(principal.tenant_id)
        .map_err(|refused| forbidden(async_graphql::Error::new(refused.to_string())))?;
    let mut data = Data::default();
    data.insert(RequestContext {
        principal: Some(principal),
        auth_error: None,
        meta,
        loaders: Default::default(),
    });
    data.insert(SocketSession::new(expires_at, permit));
    Ok((data, expires_at))
}

/// The `/graphql/ws` endpoint: `graphql-transport-ws` and the legacy `graphql-ws` protocol.
/// The HTTP layer counts the connect against the client address's rate before it gets here, and
/// may leave the request's [`RequestMeta`] in its extensions for the audit log.
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
        let meta = request
            .extensions()
            .get::<RequestMeta>()
            .cloned()
            .unwrap_or_default();
        let schema = self.schema.clone();
        let state = self.state.clone();
        // Frames and messages over the limit fail the read before they are buffered whole.
        let max_message = self.state.config.abuse.ws_max_message_bytes;
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        Ok(websocket
            .protocols(ALL_WEBSOCKET_PROTOCOLS)
            .config(config)
            .on_upgrade(move |socket| serve(socket, schema, state, meta, protocol))
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

/// Why reading from a socket failed, as the close frame says it.
fn read_failure(error: &std::io::Error, max_message: usize) -> Option<Message> {
    // poem hands over tungstenite's errors as text (`IoError::other(error.to_string())`), so the
    // size error is recognized by its message; `abuse.rs` in the tests pins it.
    let text = error.to_string();
    if text.contains("Message too long") {
        Some(close_frame(
            close::MESSAGE_TOO_BIG,
            &format!("a message may be at most {max_message} bytes"),
        ))
    } else if error.kind() == std::io::ErrorKind::Other {
        Some(close_frame(close::PROTOCOL_ERROR, &text))
    } else {
        // The connection itself failed: there is nobody to tell.
        None
    }
}

/// Runs the protocol on one socket (async-graphql's state machine) and adds what it lacks: the
/// close codes of `graphql-transport-ws` for a refused or missing `connection_init` (4403, 4408),
/// a `connection_init` over the tenant's rate (4429) and a subscription before it (4401), a
/// message that is not the protocol's (4400) and a subscription id already running (4409),
/// closing the socket (4401) when the access token it authenticated with expires, and closing it
/// with 1009 when the client sends a message over the size limit.
async fn serve(
    socket: WebSocketStream,
    schema: CdpSchema,
    state: AppState,
    meta: RequestMeta,
    protocol: WebSocketProtocols,
) {
    let max_message = state.config.abuse.ws_max_message_bytes;
    let (mut sink, stream) = socket.split();
    // The first read error ends the input; the loop below says why in the close frame.
    let read_error: Arc<Mutex<Option<Message>>> = Arc::default();
    let running = SharedRunning::default();
    let input = stream
        .take_while({
            let read_error = read_error.clone();
            move |message| {
                if let Err(error) = message {
                    *read_error.lock().unwrap_or_else(PoisonError::into_inner) =
                        read_failure(error, max_message);
                }
                futures::future::ready(message.is_ok())
            }
        })
        .filter_map(|message| {
            futures::future::ready(
                message
                    .ok()
                    .filter(|message| message.is_text() || message.is_binary())
                    .map(Message::into_bytes),
            )
        })
        .take_while({
            let running = running.clone();
            move |bytes| futures::future::ready(lock(&running).admit(bytes))
        });
    let handshake = SharedHandshake::default();
    let mut stopping = state.stopping.subscribe();
    let on_init = {
        let handshake = handshake.clone();
        move |payload| authenticate_socket(state, meta, payload, handshake)
    };
    let messages = async_graphql::http::WebSocket::new(Admitted(schema), input, protocol)
        .on_connection_init(on_init);
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
            // 1001 (going away): clients reconnect, to another replica behind a balancer.
            () = async { drop(stopping.wait_for(|stop| *stop).await) } => {
                let _ = sink.send(close_frame(close::GOING_AWAY, "the server is shutting down")).await;
                break;
            }
        };
        let outgoing = match next {
            Some(WsMessage::Text(text)) => {
                lock(&running).completed_by_server(&text);
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
                    Some((refused_code, refused)) => close_frame(refused_code, &refused),
                    None if !acked && code == 1011 => {
                        close_frame(close::UNAUTHORIZED, "Unauthorized")
                    }
                    None if code == close::PROTOCOL_ERROR => close_frame(
                        close::BAD_MESSAGE,
                        &format!("Invalid message received: {reason}"),
                    ),
                    None => close_frame(code, &reason),
                };
                let _ = sink.send(frame).await;
                break;
            }
            None => {
                let failed = read_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                // The legacy protocol ends the stream after its `connection_error` message; the
                // client's input ends early after a protocol violation.
                let refused = lock(&handshake).refused.clone();
                let violation = lock(&running).violation.take();
                let frame = failed
                    .or_else(|| {
                        refused.map(|(refused_code, refused)| close_frame(refused_code, &refused))
                    })
                    .or_else(|| violation.map(|(code, reason)| close_frame(code, &reason)));
                if let Some(frame) = frame {
                    let _ = sink.send(frame).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_subscription_id_cannot_come_again_until_it_completes() {
        let mut running = RunningSubscriptions::default();
        let subscribe =
            br#"{"type":"subscribe","id":"1","payload":{"query":"subscription { x }"}}"#;
        assert!(running.admit(subscribe));
        assert!(running.admit(br#"{"type":"subscribe","id":"2","payload":{}}"#));
        assert!(!running.admit(subscribe));
        assert_eq!(
            running.violation,
            Some((
                close::DUPLICATE_ID,
                "Subscriber for 1 already exists".to_owned()
            ))
        );

        let mut running = RunningSubscriptions::default();
        assert!(running.admit(subscribe));
        assert!(running.admit(br#"{"type":"complete","id":"1"}"#));
        assert!(running.admit(subscribe));
        running.completed_by_server(r#"{"type":"complete","id":"1"}"#);
        assert!(running.admit(subscribe));
        // What does not parse is left to the protocol's state machine.
        assert!(running.admit(b"{not json"));
        assert_eq!(running.violation, None);
    }
}

#[cfg(test)]
mod operation_kinds {
    use super::*;
    use crate::graphql::limits::FieldLimits;

    fn operations(body: &str) -> Operations {
        parse_operations(
            body.as_bytes(),
            10,
            FieldLimits {
                max_root_fields: 10,
                max_account_fields: 10,
                introspection: true,
            },
            &Caches::new(10, 10, None),
        )
        .unwrap_or_else(|_| panic!("{body} parses"))
    }

    #[test]
    fn only_queries_tells_read_only_requests() {
        let query = r#"{"query": "query Profile($id: ID!) { profile(id: $id) { id } }", "variables": {"id": "x"}}"#;
        assert!(operations(query).only_queries());
        assert!(operations(r#"{"query": "{ me { id } }"}"#).only_queries());
        assert!(!operations(r#"{"query": "mutation { logout }"}"#).only_queries());
        let batch = r#"[{"query": "{ me { id } }"}, {"query": "mutation { logout }"}]"#;
        assert!(!operations(batch).only_queries());
        let named =
            r#"{"query": "query A { me { id } } mutation B { logout }", "operationName": "B"}"#;
        assert!(!operations(named).only_queries());
        let named =
            r#"{"query": "query A { me { id } } mutation B { logout }", "operationName": "A"}"#;
        assert!(operations(named).only_queries());
        let lone = r#"{"query": "mutation B { logout }"}"#;
        assert!(!operations(lone).only_queries());
    }
}
