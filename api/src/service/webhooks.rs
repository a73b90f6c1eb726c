//! Webhooks: tenant admins register HTTPS endpoints that receive segment membership changes,
//! lifecycle transitions, stored events and profile changes as signed HTTP deliveries.
//!
//! Guarantees: a delivery is queued in the transaction of the change it describes ([`enqueue`],
//! called by `reactions::react`), so a rolled-back change sends nothing and a committed one is
//! never missed; the worker (`jobs/webhooks.rs`) sends it at least once, signed. A webhook's
//! secret is shown once, at creation, and is never stored: it is derived from the server's
//! encryption key and a per-webhook salt ([`derive_secret`], ADR 0006). Payloads carry ids, names
//! and timestamps only, never traits or identifiers (no PII leaves through a webhook).

use std::net::IpAddr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use domain::{Permission, TenantId};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

use super::audit;
use super::auth::require_permission;
use super::bus::{Notice, ProfileChangeKind};
use super::pagination::{build_page, decode_cursor, page_size, Page};
use super::{AppState, RequestMeta, ServiceError, ServiceResult};
use crate::auth::{Principal, PrincipalKind};
use crate::store::{self, Backend, StoreResult, TenantTx};

/// The most webhooks one tenant may have: every write transaction of the tenant matches its
/// notices against all of them.
pub const MAX_WEBHOOKS: usize = 25;
const MAX_URL_LENGTH: usize = 2000;
const MAX_EVENT_NAME: usize = 200;
/// Prefix of every webhook secret, so that a leaked one is recognisable.
pub const SECRET_PREFIX: &str = "whsec_";

/// What a webhook can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Topic {
    SegmentMembership,
    LifecycleTransition,
    EventIngested,
    ProfileChanged,
}

impl Topic {
    pub const ALL: [Topic; 4] = [
        Topic::SegmentMembership,
        Topic::LifecycleTransition,
        Topic::EventIngested,
        Topic::ProfileChanged,
    ];

    /// The name in payloads and in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::SegmentMembership => "segment.membership",
            Topic::LifecycleTransition => "lifecycle.transition",
            Topic::EventIngested => "event.ingested",
            Topic::ProfileChanged => "profile.changed",
        }
    }

    pub fn parse(name: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|topic| topic.as_str() == name)
    }

    /// The topic a notice is delivered under, if any (email deliveries are not).
    pub fn of(notice: &Notice) -> Option<Topic> {
        match notice {
            Notice::SegmentMembership { .. } => Some(Topic::SegmentMembership),
            Notice::StageTransition { .. } => Some(Topic::LifecycleTransition),
            Notice::EventIngested { .. } => Some(Topic::EventIngested),
            Notice::ProfileChanged { .. } => Some(Topic::ProfileChanged),
            Notice::EmailDelivery { .. } => None,
        }
    }
}

/// A registered endpoint, as the service returns it (never with its secret).
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: Uuid,
    pub url: String,
    pub topics: Vec<Topic>,
    pub segment_id: Option<Uuid>,
    pub event_name: Option<String>,
    pub active: bool,
    pub created_at: DateTime<Utc>,
}

fn topics_of(value: &Value) -> Vec<Topic> {
    value
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(Value::as_str)
                .filter_map(Topic::parse)
                .collect()
        })
        .unwrap_or_default()
}

impl From<store::webhooks::WebhookRow> for Webhook {
    fn from(row: store::webhooks::WebhookRow) -> Self {
        Webhook {
            id: row.id,
            topics: topics_of(&row.topics),
            url: row.url,
            segment_id: row.segment_id,
            event_name: row.event_name,
            active: row.active,
            created_at: row.created_at,
        }
    }
}

impl Webhook {
    /// Whether this webhook receives `notice`: it subscribes to the notice's topic, and the
    /// filter of that topic (segment for memberships, event name for events), if set, matches.
    /// A filter narrows only the topic it concerns.
    pub fn wants(&self, notice: &Notice) -> bool {
        let Some(topic) = Topic::of(notice) else {
            return false;
        };
        if !self.topics.contains(&topic) {
            return false;
        }
        match notice {
            Notice::SegmentMembership { segment_id, .. } => {
                self.segment_id.is_none_or(|wanted| wanted == *segment_id)
            }
            Notice::EventIngested { name, .. } => self
                .event_name
                .as_deref()
                .is_none_or(|wanted| name.as_deref() == Some(wanted)),
            _ => true,
        }
    }
}

/// The status of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    Queued,
    Sent,
    Failed,
}

/// One attempt of a delivery.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: DateTime<Utc>,
    pub status_code: Option<i32>,
    pub error: Option<String>,
}

/// One entry of a webhook's delivery log.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub topic: Option<Topic>,
    pub payload: Value,
    pub status: DeliveryStatus,
    pub attempts: i32,
    /// When the next attempt is due; only while queued.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub attempt_log: Vec<Attempt>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

impl From<store::webhooks::DeliveryRow> for Delivery {
    fn from(row: store::webhooks::DeliveryRow) -> Self {
        let status = match row.status.as_str() {
            store::webhooks::SENT => DeliveryStatus::Sent,
            store::webhooks::FAILED => DeliveryStatus::Failed,
            _ => DeliveryStatus::Queued,
        };
        let attempt_log = row
            .attempt_log
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|entry| {
                        let at = entry.get("at")?.as_str()?.parse().ok()?;
                        Some(Attempt {
                            at,
                            status_code: entry
                                .get("statusCode")
                                .and_then(Value::as_i64)
                                .and_then(|code| i32::try_from(code).ok()),
                            error: entry
                                .get("error")
                                .and_then(Value::as_str)
                                .map(str::to_owned),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Delivery {
            id: row.id,
            webhook_id: row.webhook_id,
            topic: Topic::parse(&row.topic),
            payload: row.payload,
            next_attempt_at: (status == DeliveryStatus::Queued).then_some(row.next_attempt_at),
            status,
            attempts: row.attempts,
            last_status_code: row.last_status_code,
            last_error: row.last_error,
            attempt_log,
            created_at: row.created_at,
            sent_at: row.sent_at,
        }
    }
}

/// What `createWebhook` asks for, unvalidated.
#[derive(Debug, Clone)]
pub struct CreateWebhookCommand {
    pub url: String,
    pub topics: Vec<Topic>,
    pub segment_id: Option<String>,
    pub event_name: Option<String>,
}

/// Checks a webhook URL: `https` only, without credentials or fragment, and not an address of
/// this machine or a private network given literally. With `allow_http` (development and tests),
/// `http://localhost`, `http://127.0.0.1` and `http://[::1]` are accepted as well, and the
/// address check is off. Returns the URL in normal form.
pub fn parse_url(raw: &str, allow_http: bool) -> ServiceResult<String> {
    let bad = |message: &str| ServiceError::bad_input("url", message);
    let raw = raw.trim();
    if raw.len() > MAX_URL_LENGTH {
        return Err(bad(&format!(
            "url must be at most {MAX_URL_LENGTH} characters"
        )));
    }
    let url = reqwest::Url::parse(raw).map_err(|_| bad("url is not an absolute URL"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("url must not contain credentials"));
    }
    if url.fragment().is_some() {
        return Err(bad("url must not contain a fragment"));
    }
    let Some(host) = url.host_str() else {
        return Err(bad("url must name a host"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback());
    match url.scheme() {
        "https" => {
            if !allow_http && (loopback || host.parse::<IpAddr>().is_ok_and(is_internal)) {
                return Err(bad(
                    "url must not point at this machine or a private network",
                ));
            }
        }
        "http" if allow_http && loopback => {}
        "http" if allow_http => {
            return Err(bad(
                "url must use https (http is accepted only for localhost and 127.0.0.1)",
            ))
        }
        _ => return Err(bad("url must use https")),
    }
    Ok(url.to_string())
}

/// Addresses a webhook must not be pointed at literally: loopback, private, link-local,
/// unspecified and unique-local ranges.
fn is_internal(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                // fc00::/7 (unique local) and fe80::/10 (link local).
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6.to_ipv4_mapped().is_some_and(|v4| is_internal(IpAddr::V4(v4)))
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// The signing secret of a webhook: `whsec_` and the base64url of
/// HMAC-SHA256(key, "cdp-webhook-secret-v1:{tenant}:{webhook}:{salt}"), where the key is a secret
/// of the tenant key ([`signing_key`]). Nothing in the database alone yields it, and rotating the
/// master key `CDP_ENCRYPTION_KEY` leaves it as it is.
/// The tenant's key webhook secrets derive from.
pub fn signing_key(keys: &super::vault::TenantKeys) -> [u8; 32] {
    *keys.secret("webhook-secret-v1").as_bytes()
}

pub fn derive_secret(
    encryption_key: &[u8; 32],
    tenant_id: TenantId,
    webhook_id: Uuid,
    salt: &str,
) -> String {
    let label = format!("cdp-webhook-secret-v1:{tenant_id}:{webhook_id}:{salt}");
    let bytes = hmac_sha256(encryption_key, &[label.as_bytes()]);
    format!("{SECRET_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The `Webhook-Signature` header value: `v1=` and the lowercase hex of
/// HMAC-SHA256(key = the secret's UTF-8 bytes, message = "{timestamp}.{body}").
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    let timestamp = timestamp.to_string();
    let mac = hmac_sha256(
        secret.as_bytes(),
        &[timestamp.as_bytes(), b".", body.as_bytes()],
    );
    format!("v1={}", hex::encode(mac))
}

/// Only user accounts with API_KEYS_MANAGE manage webhooks: a webhook sends data out of the
/// service, like an API key lets it be read, and an API key may not create one for itself.
fn require_manager(principal: Option<&Principal>) -> ServiceResult<&Principal> {
    let principal = require_permission(principal, Permission::ApiKeysManage)?;
    if !matches!(principal.kind, PrincipalKind::User { .. }) {
        return Err(ServiceError::Forbidden(
            "api keys cannot manage webhooks".to_owned(),
        ));
    }
    Ok(principal)
}

fn parse_webhook_id(id: &str) -> ServiceResult<Uuid> {
    Uuid::parse_str(id.trim()).map_err(|_| ServiceError::NotFound("webhook"))
}

async fn load(tx: &TenantTx, id: Uuid) -> ServiceResult<store::webhooks::WebhookRow> {
    store::webhooks::get(tx, id)
        .await?
        .ok_or(ServiceError::NotFound("webhook"))
}

/// Registers a webhook and returns it with its secret, which is shown here once.
#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn create(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    command: CreateWebhookCommand,
) -> ServiceResult<(Webhook, String)> {
    let principal = require_manager(principal)?;
    let url = parse_url(&command.url, state.config.webhook_allow_http)?;
    let mut topics = command.topics;
    topics.sort();
    topics.dedup();
    if topics.is_empty() {
        return Err(ServiceError::bad_input(
            "topics",
            "topics must name at least one topic",
        ));
    }
    let segment_id = match command.segment_id.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(id) => {
            if !topics.contains(&Topic::SegmentMembership) {
                return Err(ServiceError::bad_input(
                    "segmentId",
                    "segmentId filters the SEGMENT_MEMBERSHIP topic; subscribe to it as well",
                ));
            }
            Some(Uuid::parse_str(id).map_err(|_| ServiceError::NotFound("segment"))?)
        }
    };
    let event_name = match command.event_name.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(name) => {
            if !topics.contains(&Topic::EventIngested) {
                return Err(ServiceError::bad_input(
                    "eventName",
                    "eventName filters the EVENT_INGESTED topic; subscribe to it as well",
                ));
            }
            if name.chars().count() > MAX_EVENT_NAME || name.chars().any(char::is_control) {
                return Err(ServiceError::bad_input(
                    "eventName",
                    format!(
                        "eventName must be at most {MAX_EVENT_NAME} characters without control characters"
                    ),
                ));
            }
            Some(name.to_owned())
        }
    };
    let now = state.now();
    let tx = state.store.begin(principal.tenant_id).await?;
    if let Some(segment_id) = segment_id {
        store::segments::get(&tx, segment_id)
            .await?
            .ok_or(ServiceError::NotFound("segment"))?;
    }
    if store::webhooks::list(&tx).await?.len() >= MAX_WEBHOOKS {
        return Err(ServiceError::Conflict(format!(
            "a tenant has at most {MAX_WEBHOOKS} webhooks; delete one first"
        )));
    }
    let tenant_keys = state.vault.tenant(&tx).await?;
    let id = Uuid::now_v7();
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = hex::encode(salt);
    let topic_names: Vec<&str> = topics.iter().map(|topic| topic.as_str()).collect();
    let row = store::webhooks::insert(
        &tx,
        store::webhooks::NewWebhook {
            id,
            url: &url,
            topics: json!(topic_names),
            segment_id,
            event_name: event_name.as_deref(),
            secret_salt: &salt,
        },
        now,
    )
    .await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "webhook.create",
        Some(&format!("webhook:{id}")),
        Some(json!({
            "url": url,
            "topics": topic_names,
            "segmentId": segment_id,
            "eventName": event_name,
        })),
    )
    .await?;
    tx.commit().await?;
    let secret = derive_secret(&signing_key(&tenant_keys), principal.tenant_id, id, &salt);
    Ok((row.into(), secret))
}

/// Deletes a webhook with its delivery log; queued deliveries are not sent.
#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn delete(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    id: &str,
) -> ServiceResult<bool> {
    let principal = require_manager(principal)?;
    let id = parse_webhook_id(id)?;
    let tx = state.store.begin(principal.tenant_id).await?;
    let row = load(&tx, id).await?;
    store::webhooks::delete(&tx, id).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "webhook.delete",
        Some(&format!("webhook:{id}")),
        Some(json!({"url": row.url})),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Pauses or resumes a webhook. A paused webhook queues nothing, and deliveries already queued
/// for it fail instead of being sent.
#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn set_active(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    id: &str,
    active: bool,
) -> ServiceResult<Webhook> {
    let principal = require_manager(principal)?;
    let id = parse_webhook_id(id)?;
    let tx = state.store.begin(principal.tenant_id).await?;
    load(&tx, id).await?;
    let row = store::webhooks::set_active(&tx, id, active).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        if active {
            "webhook.activate"
        } else {
            "webhook.deactivate"
        },
        Some(&format!("webhook:{id}")),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(row.into())
}

pub async fn list(state: &AppState, principal: Option<&Principal>) -> ServiceResult<Vec<Webhook>> {
    let principal = require_manager(principal)?;
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(store::webhooks::list(&tx)
        .await?
        .into_iter()
        .map(Webhook::from)
        .collect())
}

/// The delivery log of one webhook, newest first.
pub async fn deliveries(
    state: &AppState,
    principal: Option<&Principal>,
    webhook_id: &str,
    first: Option<i32>,
    after: Option<&str>,
) -> ServiceResult<Page<Delivery>> {
    let principal = require_manager(principal)?;
    let webhook_id = parse_webhook_id(webhook_id)?;
    let limit = page_size(first)?;
    let before = decode_cursor(after)?;
    let tx = state.store.read(principal.tenant_id).await?;
    load(&tx, webhook_id).await?;
    let (rows, total) =
        store::webhooks::deliveries_page(&tx, webhook_id, before, limit + 1).await?;
    Ok(build_page(
        rows,
        limit,
        Some(total),
        |row| row.id,
        Delivery::from,
    ))
}

/// The JSON body of a delivery: `{"topic", "occurredAt", "data"}`, with ids, names, reasons and
/// timestamps only. `now` stands in for notices that carry no time of their own.
pub fn payload(notice: &Notice, now: DateTime<Utc>) -> Option<Value> {
    let topic = Topic::of(notice)?;
    let (occurred_at, data) = match notice {
        Notice::SegmentMembership {
            segment_id,
            profile_id,
            entered,
            at,
            reason,
            ..
        } => (
            *at,
            json!({
                "segmentId": segment_id,
                "profileId": profile_id,
                "entered": entered,
                "reason": reason,
            }),
        ),
        Notice::StageTransition {
            profile_id,
            from,
            to,
            at,
            reason,
            ..
        } => (
            *at,
            json!({"profileId": profile_id, "from": from, "to": to, "reason": reason}),
        ),
        Notice::EventIngested {
            event_id,
            profile_id,
            name,
            ..
        } => (
            now,
            json!({"eventId": event_id, "profileId": profile_id, "name": name}),
        ),
        Notice::ProfileChanged {
            profile_id, kind, ..
        } => {
            let mut data = json!({"profileId": profile_id, "change": kind.as_str()});
            if let ProfileChangeKind::Merged { into } = kind {
                data["mergedInto"] = json!(into);
            }
            (now, data)
        }
        Notice::EmailDelivery { .. } => return None,
    };
    Some(json!({
        "topic": topic.as_str(),
        "occurredAt": occurred_at,
        "data": data,
    }))
}

/// Queues the webhook deliveries that `notices` trigger, in the caller's transaction. Costs
/// nothing when no notice has a topic, and one indexed query when the tenant has no active
/// webhook. Returns no further notices (deliveries are not published on the bus).
pub async fn enqueue(
    tx: &TenantTx,
    _backend: Backend,
    active: Option<&[Webhook]>,
    notices: &[Notice],
    now: DateTime<Utc>,
) -> StoreResult<Vec<Notice>> {
    if !notices.iter().any(|notice| Topic::of(notice).is_some()) {
        return Ok(Vec::new());
    }
    let read: Vec<Webhook>;
    let webhooks = match active {
        Some(active) => active,
        None => {
            read = store::webhooks::active(tx)
                .await?
                .into_iter()
                .map(Webhook::from)
                .collect();
            read.as_slice()
        }
    };
    if webhooks.is_empty() {
        return Ok(Vec::new());
    }
    let tenant_id = tx.tenant_id();
    let mut deliveries = Vec::new();
    for notice in notices {
        // A write path only hands its own tenant's notices; never send another tenant's.
        if notice.tenant_id() != tenant_id {
            continue;
        }
        let (Some(topic), Some(body)) = (Topic::of(notice), payload(notice, now)) else {
            continue;
        };
        for webhook in webhooks.iter().filter(|webhook| webhook.wants(notice)) {
            deliveries.push(store::webhooks::NewDelivery {
                id: Uuid::now_v7(),
                webhook_id: webhook.id,
                topic: topic.as_str(),
                payload: body.clone(),
                profile_id: notice.profile_id(),
            });
        }
    }
    store::webhooks::enqueue(tx, deliveries, now).await?;
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_without_credentials() {
        assert_eq!(
            parse_url("https://hooks.example.com/cdp?x=1", false).unwrap(),
            "https://hooks.example.com/cdp?x=1"
        );
        for bad in [
            "http://hooks.example.com/",
            "ftp://hooks.example.com/",
            "https://user:pass@hooks.example.com/",
            "https://user@hooks.example.com/",
            "https://hooks.example.com/#part",
            "not a url",
            "https://127.0.0.1/",
            "https://localhost/",
            "https://10.1.2.3/",
            "https://192.168.0.1/",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/",
            "https://[fd00::1]/",
            "http://127.0.0.1:8080/",
        ] {
            let error = parse_url(bad, false).unwrap_err();
            assert!(
                matches!(&error, ServiceError::BadInput { field, .. } if field == "url"),
                "{bad}: {error:?}"
            );
        }
    }

    #[test]
    fn plain_http_is_accepted_for_localhost_only_when_allowed() {
        assert!(parse_url("http://127.0.0.1:8080/hook", true).is_ok());
        assert!(parse_url("http://localhost:8080/hook", true).is_ok());
        assert!(parse_url("http://[::1]:8080/hook", true).is_ok());
        assert!(parse_url("http://hooks.example.com/", true).is_err());
        assert!(parse_url("http://user:pw@127.0.0.1/", true).is_err());
    }

    #[test]
    fn the_signature_is_hex_hmac_of_timestamp_dot_body() {
        // RFC 4231 test case 2 uses key "Jefe" and "what do ya want for nothing?".
        assert_eq!(
            signature("Jefe", 0, "").len(),
            3 + 64,
            "v1= and 32 bytes in hex"
        );
        let expected = hex::encode(hmac_sha256(b"Jefe", &[b"what do ya want for nothing?"]));
        assert_eq!(
            expected,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let signed = signature("whsec_abc", 1700000000, "{\"a\":1}");
        let direct = hex::encode(hmac_sha256(b"whsec_abc", &[b"1700000000.{\"a\":1}"]));
        assert_eq!(signed, format!("v1={direct}"));
    }

    #[test]
    fn secrets_differ_per_webhook_salt_and_key() {
        let tenant = TenantId(Uuid::nil());
        let id = Uuid::from_u128(1);
        let one = derive_secret(&[1; 32], tenant, id, "aa");
        assert!(one.starts_with(SECRET_PREFIX));
        assert_eq!(one, derive_secret(&[1; 32], tenant, id, "aa"));
        assert_ne!(one, derive_secret(&[1; 32], tenant, id, "ab"));
        assert_ne!(one, derive_secret(&[2; 32], tenant, id, "aa"));
        assert_ne!(
            one,
            derive_secret(&[1; 32], tenant, Uuid::from_u128(2), "aa")
        );
    }

    #[test]
    fn filters_narrow_only_their_topic() {
        let tenant_id = TenantId(Uuid::nil());
        let segment = Uuid::from_u128(7);
        let webhook = Webhook {
            id: Uuid::nil(),
            url: String::new(),
            topics: vec![Topic::SegmentMembership, Topic::EventIngested],
            segment_id: Some(segment),
            event_name: Some("Order Completed".to_owned()),
            active: true,
            created_at: Utc::now(),
        };
        let membership = |segment_id| Notice::SegmentMembership {
            tenant_id,
            segment_id,
            profile_id: Uuid::nil(),
            entered: true,
            at: Utc::now(),
            reason: "message".to_owned(),
        };
        let event = |name: &str| Notice::EventIngested {
            tenant_id,
            event_id: Uuid::nil(),
            profile_id: Uuid::nil(),
            name: Some(name.to_owned()),
        };
        assert!(webhook.wants(&membership(segment)));
        assert!(!webhook.wants(&membership(Uuid::from_u128(8))));
        assert!(webhook.wants(&event("Order Completed")));
        assert!(!webhook.wants(&event("Page Viewed")));
        assert!(!webhook.wants(&Notice::ProfileChanged {
            tenant_id,
            profile_id: Uuid::nil(),
            kind: ProfileChangeKind::Created,
        }));
    }
}
