//! The data-collection API, compatible with the Segment HTTP Tracking API: `/v1/batch` and the
//! single-message paths, the browser library's short paths, HTTP Basic or `writeKey` auth, gzip,
//! bodies parsed as JSON whatever their Content-Type, request limits (413 with nothing stored),
//! per-address, per-tenant and per-key rate limits (429 with Retry-After), and partial rejection.
//!
//! Guarantees: the answer is 200 only after every accepted message is committed.

use std::borrow::Cow;
use std::io::Read;

use base64::Engine;
use poem::http::{header, StatusCode};
use poem::web::Data;
use poem::{handler, Body, Request, Response};
use serde_json::{json, Value};

use super::client::client_ip;
use super::ratelimit::RateLimits;
use crate::auth::{cache, secrets, Principal, PrincipalKind};
use crate::service::ingest::{self, Batch, Outcome, Source};
use crate::service::{self, settings, AppState, ServiceError};

fn answer(status: StatusCode, body: Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
}

fn failure(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    answer(
        status,
        json!({"success": false, "code": code, "message": message.into()}),
    )
}

/// 429 with `Retry-After`, before anything is stored.
fn rate_limited(seconds: u64, message: &str) -> Response {
    let mut response = failure(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        format!("{message}; retry in {seconds} s"),
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from(seconds.max(1)),
    );
    response
}

/// A refusal of the whole request, before anything is stored.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            message: message.into(),
        }
    }

    fn into_response(self) -> Response {
        failure(self.status, self.code, self.message)
    }
}

/// The write key from `Authorization: Basic base64(key:)` or `Bearer key`.
fn header_key(request: &Request) -> Option<String> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    if let Some(encoded) = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
    {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let key = text.split_once(':').map(|(user, _)| user).unwrap_or(&text);
        return Some(key.to_owned());
    }
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(|key| key.trim().to_owned())
}

/// Decompresses a gzip body, refusing anything that grows past `limit`.
fn gunzip(bytes: &[u8], limit: usize) -> Result<Vec<u8>, Refusal> {
    let mut decoder = flate2::read::GzDecoder::new(bytes).take(limit as u64 + 1);
    let mut out = Vec::new();
    decoder.read_to_end(&mut out).map_err(|error| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            "invalid_gzip",
            format!("the gzip body cannot be read: {error}"),
        )
    })?;
    if out.len() > limit {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request is larger than {limit} bytes after decompression"),
        ));
    }
    Ok(out)
}

/// Parses the body as JSON. Invalid UTF-8 inside a string spoils only the messages that hold it:
/// the body is read again with replacement characters and those messages are marked.
fn parse_body(bytes: &[u8]) -> Result<(Value, bool), Refusal> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => Ok((value, false)),
        Err(strict_error) => {
            let lossy = String::from_utf8_lossy(bytes);
            if matches!(lossy, std::borrow::Cow::Owned(_)) {
                if let Ok(value) = serde_json::from_str::<Value>(&lossy) {
                    return Ok((value, true));
                }
            }
            Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not JSON: {strict_error}"),
            ))
        }
    }
}

fn contains_replacement(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\u{FFFD}'),
        Value::Array(items) => items.iter().any(contains_replacement),
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\u{FFFD}') || contains_replacement(value)),
        _ => false,
    }
}

/// The principal behind a key. A write key's principal is reused for a few seconds (see
/// `auth::cache`), which saves a transaction per request; a key revoked through this process
/// stops working at once. Secret keys are always checked against the database.
async fn authenticate(state: &AppState, key: &str) -> Result<Principal, ServiceError> {
    let key_hash = secrets::hash(key);
    if let Some(principal) = cache::WRITE_KEYS.get(&key_hash) {
        return Ok(principal);
    }
    let ticket = cache::WRITE_KEYS.ticket();
    let principal = service::auth::authenticate_api_key(state, key).await?;
    if matches!(principal.kind, PrincipalKind::WriteKey { .. }) {
        cache::WRITE_KEYS.insert(ticket, key_hash, principal.clone());
    }
    Ok(principal)
}

async fn collect(
    kind: Option<&'static str>,
    request: &Request,
    body: Body,
    state: &AppState,
    limits: &RateLimits,
) -> Response {
    // Counted before the body is read or the key is checked, so that a flood costs nothing.
    if let Some(address) = client_ip(request, &state.config.abuse.trusted_proxies) {
        if let Err(retry) = state.request_limits.ingest_from_ip(address) {
            return rate_limited(retry.seconds, "too many requests from this address");
        }
    }
    let received_at = state.now();
    let cap = state.config.ingest_max_body_bytes;
    let raw = match body.into_bytes_limit(cap).await {
        Ok(bytes) => bytes,
        Err(poem::error::ReadBodyError::PayloadTooLarge) => {
            return failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request is larger than {cap} bytes"),
            )
        }
        Err(error) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("the body cannot be read: {error}"),
            )
        }
    };
    let gzipped = request
        .headers()
        .get(header::CONTENT_ENCODING)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.to_ascii_lowercase().contains("gzip"));
    // Parsed from the bytes as received; only a compressed body gets a buffer of its own.
    let bytes = if gzipped {
        match gunzip(&raw, cap) {
            Ok(bytes) => Cow::Owned(bytes),
            Err(refusal) => return refusal.into_response(),
        }
    } else {
        Cow::Borrowed(&raw[..])
    };
    let (mut document, lossy) = match parse_body(&bytes) {
        Ok(parsed) => parsed,
        Err(refusal) => return refusal.into_response(),
    };
    let Some(object) = document.as_object_mut() else {
        return failure(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be a JSON object",
        );
    };

    let key = header_key(request).or_else(|| {
        object
            .get("writeKey")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let body_key = object.remove("writeKey");
    let Some(key) = key.filter(|key| !key.is_empty()) else {
        return failure(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send the write key as HTTP Basic user name or as writeKey",
        );
    };
    let _ = body_key;
    let principal = match authenticate(state, &key).await {
        Ok(principal) => principal,
        Err(ServiceError::Unexpected(error)) => {
            tracing::error!(error = ?error, "collection API authentication failed");
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            );
        }
        Err(_) => {
            return failure(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the write key is wrong or revoked",
            )
        }
    };
    let (key_id, channel) = match &principal.kind {
        PrincipalKind::WriteKey { key_id, channel }
        | PrincipalKind::SecretKey { key_id, channel } => (*key_id, *channel),
        PrincipalKind::User { .. } => {
            return failure(StatusCode::UNAUTHORIZED, "unauthorized", "use a write key")
        }
    };
    let settings = match settings::load_cached(state, principal.tenant_id).await {
        Ok(settings) => settings,
        Err(error) => {
            tracing::error!(error = ?error, "cannot load ingestion settings");
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            );
        }
    };
    if bytes.len() > settings.max_request_bytes {
        return failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the request is {} bytes; the limit is {}",
                bytes.len(),
                settings.max_request_bytes
            ),
        );
    }

    let (messages, sent_at, context) = match kind {
        None => {
            let Some(Value::Array(messages)) = object.remove("batch") else {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the body needs a batch array",
                );
            };
            (messages, object.remove("sentAt"), object.remove("context"))
        }
        Some(kind) => {
            object.insert("type".to_owned(), Value::String(kind.to_owned()));
            (vec![document], None, None)
        }
    };
    if messages.len() > settings.max_batch_messages {
        return failure(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_messages",
            format!(
                "the batch holds {} messages; the limit is {}",
                messages.len(),
                settings.max_batch_messages
            ),
        );
    }
    if let Err(wait) = limits.check(
        &[principal.tenant_id.as_uuid(), key_id.as_uuid()],
        settings.rate_limit_per_second,
        messages.len(),
    ) {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return rate_limited(seconds, "too many messages");
    }

    // Messages that held invalid UTF-8 are replaced by a marker the parser rejects with a reason.
    let messages: Vec<Value> = messages
        .into_iter()
        .map(|message| {
            if lossy && contains_replacement(&message) {
                json!({"__invalid_utf8": true, "messageId": message.get("messageId")})
            } else {
                message
            }
        })
        .collect();
    let source = Source {
        key_id: Some(key_id.as_uuid()),
        channel,
    };
    let messages_batch = Batch {
        messages,
        sent_at,
        context,
        received_at,
    };
    match ingest::ingest_with(
        state,
        principal.tenant_id,
        &source,
        messages_batch,
        &settings,
    )
    .await
    {
        Ok(report) => {
            let rejected: Vec<Value> = report
                .rejected()
                .map(|message| {
                    let reason = match &message.outcome {
                        Outcome::Rejected(rejection) => rejection.to_string(),
                        _ => String::new(),
                    };
                    json!({"index": message.index, "messageId": message.message_id, "reason": reason})
                })
                .collect();
            if rejected.is_empty() {
                answer(StatusCode::OK, json!({"success": true}))
            } else {
                answer(
                    StatusCode::OK,
                    json!({"success": true, "rejected": rejected}),
                )
            }
        }
        Err(error) => {
            let reference = uuid::Uuid::new_v4();
            tracing::error!(%reference, error = ?error, "ingestion failed");
            failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("internal error (reference {reference})"),
            )
        }
    }
}

macro_rules! endpoint {
    ($name:ident, $kind:expr) => {
        #[handler]
        pub async fn $name(
            request: &Request,
            body: Body,
            Data(state): Data<&AppState>,
            Data(limits): Data<&std::sync::Arc<RateLimits>>,
        ) -> Response {
            collect($kind, request, body, state, limits).await
        }
    };
}

endpoint!(batch, None);
endpoint!(identify, Some("identify"));
endpoint!(track, Some("track"));
endpoint!(page, Some("page"));
endpoint!(screen, Some("screen"));
endpoint!(group, Some("group"));
endpoint!(alias, Some("alias"));

/// The routes of the collection API, long and short paths.
pub fn routes() -> poem::Route {
    use poem::post;
    poem::Route::new()
        .at("/batch", post(batch))
        .at("/b", post(batch))
        .at("/import", post(batch))
        .at("/identify", post(identify))
        .at("/i", post(identify))
        .at("/track", post(track))
        .at("/t", post(track))
        .at("/page", post(page))
        .at("/p", post(page))
        .at("/screen", post(screen))
        .at("/s", post(screen))
        .at("/group", post(group))
        .at("/g", post(group))
        .at("/alias", post(alias))
        .at("/a", post(alias))
}
