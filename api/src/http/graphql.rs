//! `POST /graphql`: reads the body within its limit, counts its operations against the client
//! address's rate, authenticates the bearer credentials, counts the operations against the
//! tenant's rate, then hands them to the GraphQL layer. Also the gate in front of `/graphql/ws`,
//! which counts each connect against the client address's rate.
//!
//! Guarantees: a request over a rate is answered 429 with `Retry-After` and RATE_LIMITED before
//! anything runs; the address is counted before the credentials cost a database round trip.

use std::sync::Arc;
use std::time::Duration;

use poem::http::{header, HeaderValue, StatusCode};
use poem::web::Data;
use poem::{handler, Body, Endpoint, IntoResponse, Request, Response};

use super::client;
use crate::graphql::transport::{
    error_outcome, execute, parse_get, parse_operations, rate_limited_outcome, Caches, HttpOutcome,
    Operations,
};
use crate::graphql::{field_limits, CdpSchema, RequestContext};
use crate::service::ReadScope;
use crate::service::{self, AppState, RequestMeta, ServiceError};

fn respond(outcome: HttpOutcome) -> Response {
    let mut response = Response::builder()
        .status(StatusCode::from_u16(outcome.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store");
    if let Some(seconds) = outcome.retry_after {
        response = response.header(header::RETRY_AFTER, seconds);
    }
    response.body(outcome.body)
}

/// Bodies smaller than this are sent as they are: compressing them saves less than it costs.
const COMPRESS_FROM_BYTES: usize = 1024;

/// The answer to a GraphQL request over HTTP: gzip when the client accepts it and the body is
/// worth it; for a GET query answered without errors, `Cache-Control: private, max-age=…` (the
/// answer depends on the credentials, so only the client's own cache may keep it), else
/// `no-store`.
fn answer(request: &Request, mut outcome: HttpOutcome, cacheable: Option<Duration>) -> Response {
    // Only a cacheable answer needs to know (the scan reads the whole body).
    let succeeded = cacheable.is_some() && outcome.status == 200 && !has_errors(&outcome.body);
    let mut gzipped = false;
    if outcome.body.len() >= COMPRESS_FROM_BYTES && accepts_gzip(request) {
        if let Ok(compressed) = gzip_bytes(&outcome.body) {
            outcome.body = compressed;
            gzipped = true;
        }
    }
    let mut response = respond(outcome);
    let headers = response.headers_mut();
    headers.insert(
        header::VARY,
        HeaderValue::from_static("authorization, accept-encoding"),
    );
    if gzipped {
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    if let (Some(max_age), true) = (cacheable, succeeded) {
        let value = if max_age.is_zero() {
            "private, no-cache".to_owned()
        } else {
            format!("private, max-age={}", max_age.as_secs())
        };
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(header::CACHE_CONTROL, value);
        }
    }
    response
}

fn has_errors(body: &[u8]) -> bool {
    // A GraphQL answer names `"errors"` only when it has some (bodies are compact JSON).
    body.windows(9).any(|window| window == b"\"errors\":")
}

/// Whether `Accept-Encoding` admits gzip (`gzip` or `*` without `q=0`).
pub fn accepts_gzip(request: &Request) -> bool {
    request
        .headers()
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or_default();
            let refused = parts.any(|parameter| {
                parameter
                    .strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

pub fn gzip_bytes(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::fast(),
    );
    encoder.write_all(bytes)?;
    encoder.finish()
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
        Caches::of(schema),
    ) {
        Ok(operations) => operations,
        Err(outcome) => return answer(request, outcome, None),
    };
    run(request, state, schema, operations, client_ip, None).await
}

/// `GET /graphql`: the GraphiQL page (for a browser, or without a query), or, with `query` or
/// `extensions` in the query string, a GraphQL query (a persisted query's hash alone makes a
/// short, cacheable URL).
#[handler]
pub async fn get(
    request: &Request,
    Data(state): Data<&AppState>,
    Data(schema): Data<&CdpSchema>,
) -> Response {
    let query_string = request.uri().query().unwrap_or_default();
    let has_operation = query_string.split('&').any(|pair| {
        let key = pair.split('=').next().unwrap_or_default();
        key == "query" || key == "extensions"
    });
    // A browser navigating to the address asks for HTML: the page, which opens with the query
    // of the URL in its editor (a shareable link). GraphQL clients ask for JSON.
    let wants_page = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if !has_operation || wants_page {
        return super::graphiql::page_response();
    }
    let client_ip = client::client_ip(request, &state.config.abuse.trusted_proxies);
    if let Some(address) = client_ip {
        if let Err(retry) = state.request_limits.graphql_from_ip(address, 1) {
            return respond(rate_limited_outcome(retry.seconds));
        }
    }
    let operations = match parse_get(
        query_string,
        field_limits(&state.config.abuse),
        Caches::of(schema),
    ) {
        Ok(operations) => operations,
        Err(outcome) => return answer(request, outcome, None),
    };
    let max_age = state.config.graphql.get_max_age;
    run(request, state, schema, operations, client_ip, Some(max_age)).await
}

/// Authenticates the request, counts its operations against the tenant's rate and runs them.
async fn run(
    request: &Request,
    state: &AppState,
    schema: &CdpSchema,
    mut operations: Operations,
    client_ip: Option<std::net::IpAddr>,
    cacheable: Option<Duration>,
) -> Response {
    if let (Some(address), true) = (client_ip, operations.len() > 1) {
        if let Err(retry) = state
            .request_limits
            .graphql_from_ip(address, operations.len() - 1)
        {
            return respond(rate_limited_outcome(retry.seconds));
        }
    }
    // A request of queries only reads: its authentication and every resolver share one read
    // transaction (ADR 0012). Mutations keep a transaction per use case.
    if operations.only_queries() {
        // The scope's transaction ends as the scope goes, once the answer is built.
        ReadScope::new()
            .run(authenticate_and_execute(
                request, state, schema, operations, client_ip, cacheable,
            ))
            .await
    } else {
        authenticate_and_execute(request, state, schema, operations, client_ip, cacheable).await
    }
}

async fn authenticate_and_execute(
    request: &Request,
    state: &AppState,
    schema: &CdpSchema,
    operations: Operations,
    client_ip: Option<std::net::IpAddr>,
    cacheable: Option<Duration>,
) -> Response {
    let mut context = RequestContext {
        principal: None,
        auth_error: None,
        meta: RequestMeta {
            ip: client_ip.map(|address| address.to_string()),
        },
        loaders: Default::default(),
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
    answer(
        request,
        execute(schema, context, operations, &state.metrics).await,
        cacheable,
    )
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
