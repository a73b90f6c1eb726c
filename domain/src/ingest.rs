//! Turning one raw Segment-spec message into a clean, normalized [`Message`], or a precise
//! rejection reason.
//!
//! Guarantees: a parsed message has a known type, a message id of at most 100 characters, a
//! timestamp between 1970 and a day after `received_at` (corrected for client clock skew as the
//! Segment spec does), bounded JSON, no NUL characters, and normalized identities (trimmed,
//! lower-cased, syntax-checked emails; E.164 phones). Values that must never identify anybody are
//! ignored for identity and reported as warnings.

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{Map, Value};

use crate::identity::{IdentityKey, ANONYMOUS_ID, EMAIL, PHONE, USER_ID};

/// The types of the Segment spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
}

impl MessageType {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Identify => "identify",
            MessageType::Track => "track",
            MessageType::Page => "page",
            MessageType::Screen => "screen",
            MessageType::Group => "group",
            MessageType::Alias => "alias",
        }
    }

    pub fn parse(value: &str) -> Option<MessageType> {
        match value.trim().to_ascii_lowercase().as_str() {
            "identify" => Some(MessageType::Identify),
            "track" => Some(MessageType::Track),
            "page" => Some(MessageType::Page),
            "screen" => Some(MessageType::Screen),
            "group" => Some(MessageType::Group),
            "alias" => Some(MessageType::Alias),
            _ => None,
        }
    }
}

/// Why a message was refused. `code` is stable and machine-readable (it is what the per-source
/// data-quality counts are keyed by); `detail` explains it to a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct Rejection {
    pub code: &'static str,
    pub detail: String,
}

/// A message refused by [`parse_message`], with the `messageId` it was sent with, if any (for the
/// per-message report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedMessage {
    pub rejection: Rejection,
    pub message_id: Option<String>,
}

fn reject(code: &'static str, detail: impl Into<String>) -> Rejection {
    Rejection {
        code,
        detail: detail.into(),
    }
}

/// Bounds and settings that apply to every message of a tenant.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// Largest message, serialized, in bytes (default 32 KB).
    pub max_message_bytes: usize,
    /// Deepest nesting of traits, properties and context (default 16).
    pub max_json_depth: usize,
    /// Region for phone numbers written without a country code (ISO 3166 alpha-2, e.g. "US").
    pub default_region: Option<String>,
    /// Extra values the tenant never treats as identities (compared case-insensitively).
    pub blocked_values: Vec<String>,
    /// How far in the future a timestamp may be before it is refused.
    pub max_future: Duration,
}

impl Default for ParseOptions {
    fn default() -> Self {
        ParseOptions {
            max_message_bytes: 32 * 1024,
            max_json_depth: 16,
            default_region: None,
            blocked_values: Vec::new(),
            max_future: Duration::days(1),
        }
    }
}

/// Facts about the request a message arrived in.
#[derive(Debug, Clone)]
pub struct Envelope<'a> {
    pub received_at: DateTime<Utc>,
    /// The batch-level `sentAt`, when the message has none of its own.
    pub batch_sent_at: Option<&'a Value>,
    /// The batch-level `context` and `integrations`, merged under every message's own.
    pub batch_context: Option<&'a Value>,
    /// Used as the message id when the message has none.
    pub generated_message_id: String,
}

/// An identifier the message carries, normalized, and why it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarriedIdentity {
    pub key: IdentityKey,
    /// The value as it should be shown (today the normalized value itself).
    pub display: String,
}

/// A clean message, ready for identity resolution and storage.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub kind: MessageType,
    pub message_id: String,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    /// `alias`: the earlier identifier.
    pub previous_id: Option<String>,
    /// `group`: the account.
    pub group_id: Option<String>,
    /// `track`: the event; `page`/`screen`: the name.
    pub name: Option<String>,
    /// `identify`: profile traits; `group`: group traits.
    pub traits: Map<String, Value>,
    pub properties: Map<String, Value>,
    pub context: Map<String, Value>,
    pub timestamp: DateTime<Utc>,
    /// Identities to resolve, in the order found (user id, anonymous id, email, phone, external).
    pub identities: Vec<CarriedIdentity>,
    /// `context.consent.categoryPreferences`.
    pub consents: Vec<(String, bool)>,
    /// Things ignored but worth reporting (blocked identity values, an invalid email trait…).
    pub warnings: Vec<&'static str>,
}

/// Identity values that mean "nobody" and are never linked, whatever the tenant says.
const NEVER_IDENTITIES: [&str; 9] = [
    "",
    "null",
    "undefined",
    "anonymous",
    "0",
    "-1",
    "[object object]",
    "none",
    "nan",
];

/// True when `value` must never be treated as an identity.
pub fn is_blocked_identity(value: &str, tenant_blocked: &[String]) -> bool {
    let normalized = value.trim().to_lowercase();
    NEVER_IDENTITIES.contains(&normalized.as_str())
        || tenant_blocked
            .iter()
            .any(|blocked| blocked.trim().to_lowercase() == normalized)
}

/// Normalizes an email: trimmed, lower-cased, syntax-checked.
pub fn normalize_email(value: &str) -> Option<String> {
    crate::Email::parse(value)
        .ok()
        .map(|email| email.as_str().to_owned())
}

/// Normalizes a phone number to E.164, using `default_region` when it has no country code.
pub fn normalize_phone(value: &str, default_region: Option<&str>) -> Option<String> {
    let region = default_region.and_then(|region| {
        region
            .trim()
            .to_uppercase()
            .parse::<phonenumber::country::Id>()
            .ok()
    });
    let number = phonenumber::parse(region, value.trim()).ok()?;
    if !phonenumber::is_valid(&number) {
        return None;
    }
    Some(number.format().mode(phonenumber::Mode::E164).to_string())
}

fn contains_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(contains_nul),
        Value::Object(map) => map_contains_nul(map),
        _ => false,
    }
}

fn map_contains_nul(map: &Map<String, Value>) -> bool {
    map.iter()
        .any(|(key, value)| key.contains('\0') || contains_nul(value))
}

/// Reads an identifier field: strings as they are, numbers as their text (some clients send
/// numeric user ids); anything else is refused.
fn id_field(object: &Map<String, Value>, field: &'static str) -> Result<Option<String>, Rejection> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => {
            let text = text.trim();
            if text.chars().count() > 255 {
                return Err(reject(
                    "invalid_identifier",
                    format!("{field} is longer than 255 characters"),
                ));
            }
            Ok(Some(text.to_owned()))
        }
        Some(Value::Number(number)) => Ok(Some(number.to_string())),
        Some(_) => Err(reject(
            "invalid_identifier",
            format!("{field} must be a string"),
        )),
    }
}

/// Takes an object field out of the message (it is not read again).
fn object_field(
    object: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Map<String, Value>, Rejection> {
    match object.remove(field) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(reject(
            "invalid_field",
            format!("{field} must be an object"),
        )),
    }
}

/// Parses an RFC 3339 timestamp (or ISO 8601 without a zone, read as UTC).
pub fn parse_timestamp(value: &Value) -> Option<DateTime<Utc>> {
    let text = value.as_str()?.trim();
    if let Ok(parsed) = DateTime::parse_from_rfc3339(text) {
        return Some(parsed.with_timezone(&Utc));
    }
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|naive| Utc.from_utc_datetime(&naive))
}

/// Merges `base` under `own`: keys of `own` win; nested objects merge recursively.
fn merge_under(own: &mut Map<String, Value>, base: &Map<String, Value>) {
    for (key, value) in base {
        match (own.get_mut(key), value) {
            (Some(Value::Object(own_inner)), Value::Object(base_inner)) => {
                merge_under(own_inner, base_inner)
            }
            (Some(_), _) => {}
            (None, _) => {
                own.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Parses and normalizes one message. The message is taken, so that its traits, properties and
/// context become the parsed message's without being copied.
pub fn parse_message(
    raw: Value,
    envelope: &Envelope<'_>,
    options: &ParseOptions,
) -> Result<Message, RejectedMessage> {
    let Value::Object(mut object) = raw else {
        return Err(RejectedMessage {
            rejection: reject("not_an_object", "a message must be a JSON object"),
            message_id: None,
        });
    };
    parse_object(&mut object, envelope, options).map_err(|rejection| RejectedMessage {
        rejection,
        // Still there: parsing takes only the traits, properties and context out.
        message_id: object
            .get("messageId")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

fn parse_object(
    object: &mut Map<String, Value>,
    envelope: &Envelope<'_>,
    options: &ParseOptions,
) -> Result<Message, Rejection> {
    if object.contains_key("__invalid_utf8") {
        return Err(reject(
            "invalid_utf8",
            "the message contains bytes that are not UTF-8",
        ));
    }
    let size = crate::json::object_text_len(object);
    if size > options.max_message_bytes {
        return Err(reject(
            "message_too_large",
            format!(
                "the message is {size} bytes; the limit is {}",
                options.max_message_bytes
            ),
        ));
    }
    if map_contains_nul(object) {
        return Err(reject(
            "nul_character",
            "the message contains a NUL character",
        ));
    }
    let kind = match object.get("type").and_then(Value::as_str) {
        None => return Err(reject("missing_type", "type is required")),
        Some(kind) => MessageType::parse(kind)
            .ok_or_else(|| reject("unknown_type", format!("unknown type {kind:?}")))?,
    };
    let message_id = match object.get("messageId") {
        None | Some(Value::Null) => envelope.generated_message_id.clone(),
        Some(Value::String(id)) if id.trim().is_empty() => envelope.generated_message_id.clone(),
        Some(Value::String(id)) if id.chars().count() > 100 => {
            return Err(reject(
                "message_id_too_long",
                "messageId is longer than 100 characters",
            ))
        }
        Some(Value::String(id)) => id.trim().to_owned(),
        Some(_) => return Err(reject("invalid_field", "messageId must be a string")),
    };
    let user_id = id_field(object, "userId")?;
    let anonymous_id = id_field(object, "anonymousId")?;
    let previous_id = id_field(object, "previousId")?;
    let group_id = id_field(object, "groupId")?;

    let mut traits = object_field(object, "traits")?;
    let mut properties = object_field(object, "properties")?;
    let mut context = object_field(object, "context")?;
    // Some clients (RudderStack's) send identify traits in `context.traits` only; the top-level
    // `traits` win where both name a key.
    if kind == MessageType::Identify {
        if let Some(Value::Object(context_traits)) = context.get("traits") {
            merge_under(&mut traits, context_traits);
        }
    }
    if let Some(Value::Object(batch_context)) = envelope.batch_context {
        // Checked here, not with the message above: the batch's context becomes part of it.
        if map_contains_nul(batch_context) {
            return Err(reject(
                "nul_character",
                "the batch context contains a NUL character",
            ));
        }
        merge_under(&mut context, batch_context);
    }
    for (field, value) in [
        ("traits", &traits),
        ("properties", &properties),
        ("context", &context),
    ] {
        let depth = crate::json::object_depth(value);
        if depth > options.max_json_depth {
            return Err(reject(
                "too_deep",
                format!(
                    "{field} is nested {depth} levels deep; the limit is {}",
                    options.max_json_depth
                ),
            ));
        }
    }

    let name = match kind {
        MessageType::Track => {
            let event = object
                .get("event")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|event| !event.is_empty())
                .ok_or_else(|| reject("missing_event", "track needs an event name"))?;
            if event.chars().count() > 200 {
                return Err(reject(
                    "invalid_field",
                    "event is longer than 200 characters",
                ));
            }
            Some(event.to_owned())
        }
        MessageType::Page | MessageType::Screen => {
            if let Some(category) = object.get("category").filter(|value| !value.is_null()) {
                properties
                    .entry("category")
                    .or_insert_with(|| category.clone());
            }
            object
                .get("name")
                .and_then(Value::as_str)
                .or_else(|| properties.get("name").and_then(Value::as_str))
                .map(|name| name.trim().to_owned())
        }
        _ => None,
    };
    match kind {
        MessageType::Alias if previous_id.is_none() || user_id.is_none() => {
            return Err(reject(
                "missing_identity",
                "alias needs previousId and userId",
            ))
        }
        MessageType::Group if group_id.is_none() => {
            return Err(reject("missing_group", "group needs a groupId"))
        }
        MessageType::Alias => {}
        _ if user_id.is_none() && anonymous_id.is_none() => {
            return Err(reject(
                "missing_identity",
                "userId or anonymousId is required",
            ))
        }
        _ => {}
    }

    let timestamp = corrected_timestamp(object, envelope)?;
    let earliest = Utc
        .timestamp_opt(0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    if timestamp < earliest || timestamp > envelope.received_at + options.max_future {
        return Err(reject(
            "timestamp_out_of_range",
            format!("timestamp {timestamp} is before 1970 or too far in the future"),
        ));
    }

    let mut warnings = Vec::new();
    let mut identities = Vec::new();
    let mut carry = |kind: &str, value: &str, warnings: &mut Vec<&'static str>| {
        if is_blocked_identity(value, &options.blocked_values) {
            warnings.push("blocked_identity_value");
            return;
        }
        let identity = CarriedIdentity {
            key: IdentityKey::new(kind, value),
            display: value.to_owned(),
        };
        if !identities.contains(&identity) {
            identities.push(identity);
        }
    };
    if let Some(user_id) = &user_id {
        carry(USER_ID, user_id, &mut warnings);
    }
    if let Some(anonymous_id) = &anonymous_id {
        carry(ANONYMOUS_ID, anonymous_id, &mut warnings);
    }
    // Profile traits name identities only on identify (group traits describe the account).
    let trait_identities = kind != MessageType::Group;
    if trait_identities {
        if let Some(raw_email) = traits
            .get("email")
            .and_then(Value::as_str)
            .map(str::to_owned)
        {
            match normalize_email(&raw_email) {
                Some(email) => {
                    carry(EMAIL, &email, &mut warnings);
                    traits.insert("email".to_owned(), Value::String(email));
                }
                None if is_blocked_identity(&raw_email, &options.blocked_values) => {
                    warnings.push("blocked_identity_value")
                }
                None => warnings.push("invalid_email"),
            }
        }
        let raw_phone = match traits.get("phone") {
            Some(Value::String(phone)) => Some(phone.clone()),
            Some(Value::Number(phone)) => Some(phone.to_string()),
            _ => None,
        };
        if let Some(raw_phone) = raw_phone {
            match normalize_phone(&raw_phone, options.default_region.as_deref()) {
                Some(phone) => {
                    carry(PHONE, &phone, &mut warnings);
                    traits.insert("phone".to_owned(), Value::String(phone));
                }
                None if is_blocked_identity(&raw_phone, &options.blocked_values) => {
                    warnings.push("blocked_identity_value")
                }
                None => warnings.push("invalid_phone"),
            }
        }
    }
    if let Some(Value::Array(external_ids)) = context.get("externalIds") {
        for external in external_ids {
            let id = external.get("id").and_then(|id| match id {
                Value::String(text) => Some(text.trim().to_owned()),
                Value::Number(number) => Some(number.to_string()),
                _ => None,
            });
            let kind = external
                .get("type")
                .and_then(Value::as_str)
                .map(|kind| kind.trim().to_lowercase())
                .filter(|kind| valid_kind(kind));
            match (id, kind) {
                (Some(id), Some(kind)) if kind == EMAIL => match normalize_email(&id) {
                    Some(email) => carry(EMAIL, &email, &mut warnings),
                    None => warnings.push("invalid_email"),
                },
                (Some(id), Some(kind)) if kind == PHONE => {
                    match normalize_phone(&id, options.default_region.as_deref()) {
                        Some(phone) => carry(PHONE, &phone, &mut warnings),
                        None => warnings.push("invalid_phone"),
                    }
                }
                (Some(id), Some(kind)) => carry(&kind, &id, &mut warnings),
                _ => warnings.push("invalid_external_id"),
            }
        }
    }

    let consents = context
        .get("consent")
        .and_then(|consent| consent.get("categoryPreferences"))
        .and_then(Value::as_object)
        .map(|preferences| {
            preferences
                .iter()
                .filter_map(|(purpose, granted)| {
                    let purpose = purpose.trim();
                    (!purpose.is_empty() && purpose.len() <= 100)
                        .then_some(())
                        .and(
                            granted
                                .as_bool()
                                .map(|granted| (purpose.to_owned(), granted)),
                        )
                })
                .collect()
        })
        .unwrap_or_default();

    Ok(Message {
        kind,
        message_id,
        user_id,
        anonymous_id,
        previous_id,
        group_id,
        name,
        traits,
        properties,
        context,
        timestamp,
        identities,
        consents,
        warnings,
    })
}

/// A custom identity kind: 1 to 64 characters of lowercase letters, digits, `_`, `-` and `.`.
pub fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= 64
        && kind.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-' || b == b'.'
        })
}

/// The event time: `timestamp`, else `originalTimestamp` corrected for the client's clock skew
/// (`receivedAt - (sentAt - originalTimestamp)`), else `receivedAt`.
fn corrected_timestamp(
    object: &Map<String, Value>,
    envelope: &Envelope<'_>,
) -> Result<DateTime<Utc>, Rejection> {
    let field = |name: &'static str| -> Result<Option<DateTime<Utc>>, Rejection> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => parse_timestamp(value).map(Some).ok_or_else(|| {
                reject(
                    "invalid_timestamp",
                    format!("{name} is not an RFC 3339 timestamp"),
                )
            }),
        }
    };
    let timestamp = field("timestamp")?;
    let original = field("originalTimestamp")?;
    let sent_at = match field("sentAt")? {
        Some(sent_at) => Some(sent_at),
        None => envelope.batch_sent_at.and_then(parse_timestamp),
    };
    Ok(match (original, sent_at, timestamp) {
        (Some(original), Some(sent_at), _) => envelope.received_at - (sent_at - original),
        (_, _, Some(timestamp)) => timestamp,
        (Some(original), None, None) => original,
        (None, _, None) => envelope.received_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envelope() -> Envelope<'static> {
        Envelope {
            received_at: Utc.with_ymd_and_hms(2026, 11, 28, 10, 0, 0).unwrap(),
            batch_sent_at: None,
            batch_context: None,
            generated_message_id: "generated".to_owned(),
        }
    }

    fn parse(raw: Value) -> Result<Message, Rejection> {
        parse_message(raw, &envelope(), &ParseOptions::default())
            .map_err(|rejected| rejected.rejection)
    }

    #[test]
    fn an_identify_from_a_real_client_is_normalized() {
        let message = parse(json!({
            "type": "identify", "userId": "user-42", "anonymousId": null, "messageId": "m1",
            "timestamp": "2026-11-28T09:22:57.894436+00:00",
            "traits": {"email": " Ada@Example.com ", "phone": "+44 20 7946 0958", "plan": "pro"},
            "_metadata": {"nodeVersion": "v20"}
        }))
        .unwrap();
        assert_eq!(message.kind, MessageType::Identify);
        assert_eq!(message.traits["email"], "ada@example.com");
        assert_eq!(message.traits["phone"], "+442079460958");
        let kinds: Vec<_> = message
            .identities
            .iter()
            .map(|i| (i.key.kind.as_str(), i.key.value.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("user_id", "user-42"),
                ("email", "ada@example.com"),
                ("phone", "+442079460958")
            ]
        );
    }

    #[test]
    fn clock_skew_is_corrected_from_sent_at() {
        let message = parse(json!({
            "type": "track", "anonymousId": "a", "event": "E",
            "originalTimestamp": "2026-11-28T09:00:00Z", "sentAt": "2026-11-28T09:05:00Z"
        }))
        .unwrap();
        // The client's clock is 55 minutes behind: the event happened 5 minutes before receipt.
        assert_eq!(
            message.timestamp,
            Utc.with_ymd_and_hms(2026, 11, 28, 9, 55, 0).unwrap()
        );
    }

    #[test]
    fn blocked_values_are_ignored_for_identity_and_reported() {
        let message = parse(json!({"type": "identify", "userId": "undefined", "anonymousId": "real", "traits": {"email": "null"}})).unwrap();
        assert_eq!(message.identities.len(), 1);
        assert_eq!(message.identities[0].key.kind, "anonymous_id");
        assert_eq!(
            message.warnings,
            ["blocked_identity_value", "blocked_identity_value"]
        );
        let options = ParseOptions {
            blocked_values: vec!["guest".to_owned()],
            ..ParseOptions::default()
        };
        let message = parse_message(
            json!({"type": "track", "event": "E", "userId": "GUEST", "anonymousId": "x"}),
            &envelope(),
            &options,
        )
        .unwrap();
        assert_eq!(message.identities.len(), 1);
    }

    #[test]
    fn bad_messages_are_rejected_with_a_reason() {
        let cases = [
            (json!([1]), "not_an_object"),
            (json!({"userId": "u"}), "missing_type"),
            (json!({"type": "hover", "userId": "u"}), "unknown_type"),
            (json!({"type": "track", "userId": "u"}), "missing_event"),
            (json!({"type": "track", "event": "E"}), "missing_identity"),
            (json!({"type": "alias", "userId": "u"}), "missing_identity"),
            (
                json!({"type": "track", "event": "E", "userId": "u", "timestamp": "yesterday"}),
                "invalid_timestamp",
            ),
            (
                json!({"type": "track", "event": "E", "userId": "u", "timestamp": "1969-12-31T23:59:59Z"}),
                "timestamp_out_of_range",
            ),
            (
                json!({"type": "track", "event": "E", "userId": "u", "timestamp": "2030-01-01T00:00:00Z"}),
                "timestamp_out_of_range",
            ),
            (
                json!({"type": "track", "event": "E\u{0}", "userId": "u"}),
                "nul_character",
            ),
            (
                json!({"type": "track", "event": "E", "userId": "u", "messageId": "m".repeat(101)}),
                "message_id_too_long",
            ),
            (
                json!({"type": "track", "event": "E", "userId": "u", "properties": {"big": "x".repeat(40_000)}}),
                "message_too_large",
            ),
            (
                json!({"type": "track", "event": "E", "userId": {"id": 1}}),
                "invalid_identifier",
            ),
        ];
        for (raw, code) in cases {
            assert_eq!(
                parse(raw.clone()).map(|_| ()).unwrap_err().code,
                code,
                "{raw}"
            );
        }
        let mut deep = json!("leaf");
        for _ in 0..20 {
            deep = json!({"x": deep});
        }
        let raw = json!({"type": "track", "event": "E", "userId": "u", "properties": deep});
        assert_eq!(parse(raw).unwrap_err().code, "too_deep");
    }

    #[test]
    fn phones_need_a_region_or_a_country_code() {
        assert_eq!(
            normalize_phone("(415) 555-2671", Some("US")).as_deref(),
            Some("+14155552671")
        );
        assert_eq!(normalize_phone("(415) 555-2671", None), None);
        assert_eq!(
            normalize_phone("+49 30 901820", None).as_deref(),
            Some("+4930901820")
        );
        assert_eq!(normalize_phone("not a phone", Some("US")), None);
    }

    #[test]
    fn external_ids_and_consent_are_read_from_the_context() {
        let message = parse(json!({
            "type": "track", "event": "E", "anonymousId": "a",
            "context": {"externalIds": [{"id": "C-1", "type": "crm_id"}, {"id": "x", "type": "BAD TYPE"}],
                        "consent": {"categoryPreferences": {"email_marketing": true, "ads": false}}}
        }))
        .unwrap();
        assert!(message
            .identities
            .iter()
            .any(|i| i.key == IdentityKey::new("crm_id", "C-1")));
        assert_eq!(message.warnings, ["invalid_external_id"]);
        assert_eq!(message.consents.len(), 2);
    }

    #[test]
    fn identify_traits_sent_in_the_context_count_as_traits() {
        let message = parse(json!({
            "type": "identify", "userId": "u",
            "traits": {"plan": "pro"},
            "context": {"traits": {"plan": "free", "email": "A@B.co"}}
        }))
        .unwrap();
        assert_eq!(message.traits["plan"], "pro", "top-level traits win");
        assert_eq!(message.traits["email"], "a@b.co");
        assert!(message
            .identities
            .iter()
            .any(|i| i.key == IdentityKey::new(EMAIL, "a@b.co")));
    }

    #[test]
    fn batch_context_merges_under_the_message_context() {
        let batch_context = json!({"library": {"name": "batch"}, "ip": "1.2.3.4"});
        let envelope = Envelope {
            batch_context: Some(&batch_context),
            ..envelope()
        };
        let message = parse_message(
            json!({"type": "track", "event": "E", "userId": "u", "context": {"library": {"version": "1"}}}),
            &envelope,
            &ParseOptions::default(),
        )
        .unwrap();
        assert_eq!(
            message.context["library"],
            json!({"name": "batch", "version": "1"})
        );
        assert_eq!(message.context["ip"], "1.2.3.4");
    }

    #[test]
    fn a_rejected_message_keeps_the_id_it_was_sent_with() {
        let rejected = parse_message(
            json!({"type": "track", "messageId": "m-7", "userId": "u", "traits": {"a": 1}}),
            &envelope(),
            &ParseOptions::default(),
        )
        .unwrap_err();
        assert_eq!(rejected.rejection.code, "missing_event");
        assert_eq!(rejected.message_id.as_deref(), Some("m-7"));
        let rejected =
            parse_message(json!(["m-7"]), &envelope(), &ParseOptions::default()).unwrap_err();
        assert_eq!(rejected.rejection.code, "not_an_object");
        assert_eq!(rejected.message_id, None);
    }

    #[test]
    fn the_size_limit_counts_the_whole_message_as_json() {
        let raw = json!({"type": "track", "event": "E", "userId": "u", "properties": {"p": "x".repeat(100)}});
        let size = raw.to_string().len();
        let options = |max_message_bytes| ParseOptions {
            max_message_bytes,
            ..ParseOptions::default()
        };
        assert!(parse_message(raw.clone(), &envelope(), &options(size)).is_ok());
        let rejected = parse_message(raw, &envelope(), &options(size - 1)).unwrap_err();
        assert_eq!(rejected.rejection.code, "message_too_large");
    }

    #[test]
    fn a_nul_in_the_batch_context_rejects_the_message_it_merges_into() {
        let batch_context = json!({"library": {"name": "evil\u{0}"}});
        let envelope = Envelope {
            batch_context: Some(&batch_context),
            ..envelope()
        };
        let rejection = parse_message(
            json!({"type": "track", "event": "E", "userId": "u"}),
            &envelope,
            &ParseOptions::default(),
        )
        .unwrap_err()
        .rejection;
        assert_eq!(rejection.code, "nul_character");
    }
}

/// The channel a source sends from, as Segment sources are typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Web,
    Mobile,
    Server,
    Email,
    Social,
    Other,
}

impl Channel {
    pub const ALL: [Channel; 6] = [
        Channel::Web,
        Channel::Mobile,
        Channel::Server,
        Channel::Email,
        Channel::Social,
        Channel::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Web => "web",
            Channel::Mobile => "mobile",
            Channel::Server => "server",
            Channel::Email => "email",
            Channel::Social => "social",
            Channel::Other => "other",
        }
    }

    pub fn parse(value: &str) -> Channel {
        Channel::ALL
            .into_iter()
            .find(|channel| channel.as_str() == value)
            .unwrap_or(Channel::Other)
    }
}

/// The canonical form of a region code (ISO 3166 alpha-2, upper case), if the phone library knows it.
pub fn normalize_region(value: &str) -> Option<String> {
    let upper = value.trim().to_uppercase();
    upper
        .parse::<phonenumber::country::Id>()
        .ok()
        .map(|_| upper)
}
