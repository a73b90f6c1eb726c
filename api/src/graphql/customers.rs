//! The customer-data section: profiles, events, identify/track, merges, splits, consent, and the
//! data-quality and ingestion-settings views.

use async_graphql::{ComplexObject, Context, InputObject, Json, Object, Result, SimpleObject, ID};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::accounts::{Env, ServiceResultExt};
use super::loaders::{
    load, ConsentsOf, FirstEventsOf, GroupsOf, IdentitiesOf, MergedIdsOf, SegmentsOf, StageOf,
};
use super::types::{total_count, PageInfo};
use crate::service::ingest::{self, Outcome};
use crate::service::pagination::Page;
use crate::service::{profiles, settings, ServiceError};

/// A unified profile: one person across every channel.
#[derive(SimpleObject, Clone, Debug)]
#[graphql(complex)]
pub struct Profile {
    pub id: ID,
    /// Merged traits, latest timestamp wins per key. PII is masked without PII_READ.
    pub traits: Json<Value>,
    /// The channels the person was seen on (web, mobile, server, email, social, other).
    pub channels: Vec<String>,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub event_count: i32,
    pub created_at: DateTime<Utc>,
    #[graphql(skip)]
    inner: profiles::Profile,
}

impl From<profiles::Profile> for Profile {
    fn from(profile: profiles::Profile) -> Self {
        Profile {
            id: ID(profile.id.to_string()),
            traits: Json(profile.traits.clone()),
            channels: profile.channels.clone(),
            first_seen_at: profile.first_seen_at,
            last_seen_at: profile.last_seen_at,
            event_count: i32::try_from(profile.event_count).unwrap_or(i32::MAX),
            created_at: profile.created_at,
            inner: profile,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Identity {
    pub kind: String,
    pub value: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Consent {
    pub purpose: String,
    pub granted: bool,
    pub updated_at: DateTime<Utc>,
    /// Who or what set it: a message id, or the principal that called setConsent.
    pub source: String,
}

/// An account (a Segment group) the profile belongs to.
#[derive(SimpleObject, Clone, Debug)]
pub struct ProfileGroup {
    pub group_id: String,
    pub traits: Json<Value>,
}

/// One decision of identity resolution about this profile.
#[derive(SimpleObject, Clone, Debug)]
pub struct MergeLedgerEntry {
    pub id: ID,
    pub at: DateTime<Utc>,
    /// merge | conflict | manual_merge | split
    pub action: String,
    pub profile_id: ID,
    /// The merged profile (merge), the owner of the identifier (conflict), or the new profile (split).
    pub other_profile_id: Option<ID>,
    /// The message that caused it.
    pub message_id: Option<String>,
    /// The identifier that joined the profiles, or that was not linked.
    pub identity_kind: Option<String>,
    pub identity_value: Option<String>,
    /// The rule that decided: shared_identifier, limit:user_id=1, requested by …
    pub rule: String,
}

#[ComplexObject]
impl Profile {
    async fn identities(&self, ctx: &Context<'_>) -> Result<Vec<Identity>> {
        Ok(load(ctx, IdentitiesOf(self.inner.id))
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|identity| Identity {
                kind: identity.kind,
                value: identity.value,
            })
            .collect())
    }

    /// Key of the current lifecycle stage.
    async fn stage(&self, ctx: &Context<'_>) -> Result<Option<String>> {
        load(ctx, StageOf(self.inner.id)).await
    }

    /// The segments the profile is a member of now.
    async fn segments(&self, ctx: &Context<'_>) -> Result<Vec<super::segments::Segment>> {
        Ok(load(ctx, SegmentsOf(self.inner.id))
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(super::segments::Segment::from)
            .collect())
    }

    /// Computed customer attributes: order totals, RFM scores, churn risk.
    async fn attributes(
        &self,
        ctx: &Context<'_>,
    ) -> Result<Option<super::analytics::CustomerAttributes>> {
        super::analytics::profile_attributes(ctx, self.inner.id).await
    }

    /// The profile's stage changes, newest first.
    async fn lifecycle_transitions(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: Option<i32>,
    ) -> Result<Vec<super::segments::LifecycleTransition>> {
        super::segments::profile_transitions(ctx, self.inner.id, first).await
    }

    /// The profile's entries into and exits from segments, newest first, with their reasons.
    async fn segment_history(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: Option<i32>,
    ) -> Result<Vec<super::segments::SegmentMembershipChange>> {
        super::segments::profile_segment_history(ctx, self.inner.id, first).await
    }

    async fn consents(&self, ctx: &Context<'_>) -> Result<Vec<Consent>> {
        Ok(load(ctx, ConsentsOf(self.inner.id))
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|consent| Consent {
                purpose: consent.purpose,
                granted: consent.granted,
                updated_at: consent.updated_at,
                source: consent.source,
            })
            .collect())
    }

    /// Every change of the profile's consents, oldest first: what, who or what, when.
    async fn consent_history(
        &self,
        ctx: &Context<'_>,
    ) -> Result<Vec<super::privacy::ConsentChange>> {
        super::privacy::consent_history(ctx, self.inner.id).await
    }

    /// IDs of profiles that were merged into this one.
    async fn merged_ids(&self, ctx: &Context<'_>) -> Result<Vec<ID>> {
        Ok(load(ctx, MergedIdsOf(self.inner.id))
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|id| ID(id.to_string()))
            .collect())
    }

    /// Every merge, conflict and split that concerns this profile, newest first.
    async fn merge_ledger(&self, ctx: &Context<'_>) -> Result<Vec<MergeLedgerEntry>> {
        let env = Env::of(ctx)?;
        Ok(profiles::ledger(env.state, env.principal()?, &self.inner)
            .await
            .gql()?
            .into_iter()
            .map(|entry| MergeLedgerEntry {
                id: ID(entry.id.to_string()),
                at: entry.at,
                action: entry.action,
                profile_id: ID(entry.profile_id.to_string()),
                other_profile_id: entry.other_profile_id.map(|id| ID(id.to_string())),
                message_id: entry.message_id,
                identity_kind: entry.identity_kind,
                identity_value: entry.identity_value,
                rule: entry.rule,
            })
            .collect())
    }

    async fn groups(&self, ctx: &Context<'_>) -> Result<Vec<ProfileGroup>> {
        Ok(load(ctx, GroupsOf(self.inner.id))
            .await?
            .unwrap_or_default()
            .into_iter()
            .map(|group| ProfileGroup {
                group_id: group.group_id,
                traits: Json(group.traits),
            })
            .collect())
    }

    /// The timeline, newest first.
    async fn events(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<EventConnection> {
        let wants = event_page_wants(ctx);
        if after.is_none() {
            let key = FirstEventsOf {
                profile_id: self.inner.id,
                first,
                wants,
            };
            let page = load(ctx, key)
                .await?
                .unwrap_or_else(|| Page::empty(wants.total_count));
            return Ok(EventConnection::from(page));
        }
        let env = Env::of(ctx)?;
        profiles::events(
            env.state,
            env.principal()?,
            profiles::EventOwner::Resolved(self.inner.id),
            None,
            first,
            after.as_deref(),
            wants,
        )
        .await
        .gql()
        .map(EventConnection::from)
    }
}

/// type: identify | track | page | screen | group | alias
#[derive(SimpleObject, Clone, Debug)]
pub struct Event {
    pub id: ID,
    pub profile_id: ID,
    #[graphql(name = "type")]
    pub kind: String,
    pub name: Option<String>,
    pub properties: Json<Value>,
    pub context: Json<Value>,
    pub timestamp: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub message_id: String,
    /// The channel of the source that sent it.
    pub channel: String,
    /// The api key (source) that sent it; null for data sent by a signed-in user.
    pub source_id: Option<ID>,
}

impl From<profiles::Event> for Event {
    fn from(event: profiles::Event) -> Self {
        Event {
            id: ID(event.id.to_string()),
            profile_id: ID(event.profile_id.to_string()),
            kind: event.kind,
            name: event.name,
            properties: Json(event.properties),
            context: Json(event.context),
            timestamp: event.timestamp,
            received_at: event.received_at,
            message_id: event.message_id,
            channel: event.channel,
            source_id: event.source_id.map(|id| ID(id.to_string())),
        }
    }
}

/// What the selection of an `EventConnection` field reads: the total only when `totalCount` is
/// asked, the contexts only when `context` is (the selection is known before resolving); the
/// details and the cursors always (the compiled plans read less, `graphql/compiled`).
fn event_page_wants(ctx: &Context<'_>) -> profiles::EventPageWants {
    let selection = ctx.look_ahead();
    profiles::EventPageWants {
        total_count: selection.field("totalCount").exists(),
        context: selection
            .field("edges")
            .field("node")
            .field("context")
            .exists(),
        details: true,
        cursors: true,
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct EventEdge {
    pub node: Event,
    pub cursor: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct EventConnection {
    pub edges: Vec<EventEdge>,
    pub page_info: PageInfo,
    pub total_count: i32,
}

impl From<Page<profiles::Event>> for EventConnection {
    fn from(page: Page<profiles::Event>) -> Self {
        let page_info = PageInfo::of(&page);
        EventConnection {
            total_count: total_count(page.total_count),
            edges: page
                .items
                .into_iter()
                .map(|(event, cursor)| EventEdge {
                    node: event.into(),
                    cursor,
                })
                .collect(),
            page_info,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct ProfileEdge {
    pub node: Profile,
    pub cursor: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct ProfileConnection {
    pub edges: Vec<ProfileEdge>,
    pub page_info: PageInfo,
    pub total_count: i32,
}

impl From<Page<profiles::Profile>> for ProfileConnection {
    fn from(page: Page<profiles::Profile>) -> Self {
        let page_info = PageInfo::of(&page);
        ProfileConnection {
            total_count: total_count(page.total_count),
            edges: page
                .items
                .into_iter()
                .map(|(profile, cursor)| ProfileEdge {
                    node: profile.into(),
                    cursor,
                })
                .collect(),
            page_info,
        }
    }
}

#[derive(InputObject, Debug, Default)]
pub struct ProfileFilter {
    pub segment_id: Option<ID>,
    pub stage: Option<String>,
    /// An object of trait paths (dot-separated) and the scalar values they must equal.
    pub trait_equals: Option<Json<Value>>,
    pub seen_after: Option<DateTime<Utc>>,
    pub seen_before: Option<DateTime<Utc>>,
}

/// At least one of userId / anonymousId. messageId makes the call idempotent.
#[derive(InputObject, Debug)]
pub struct IdentifyInput {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub traits: Option<Json<Value>>,
    pub timestamp: Option<DateTime<Utc>>,
    pub message_id: Option<String>,
    pub context: Option<Json<Value>>,
}

#[derive(InputObject, Debug)]
pub struct TrackInput {
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
    pub event: String,
    pub properties: Option<Json<Value>>,
    pub timestamp: Option<DateTime<Utc>>,
    pub message_id: Option<String>,
    pub context: Option<Json<Value>>,
}

/// Per-reason count.
#[derive(SimpleObject, Clone, Debug)]
pub struct ReasonCount {
    pub reason: String,
    pub count: i32,
}

/// What a source sent and what became of it: the data-quality view of one source.
#[derive(SimpleObject, Clone, Debug)]
pub struct SourceQuality {
    /// The api key of the source; null for data sent through GraphQL by users or `cdp import`.
    pub source_id: Option<ID>,
    pub name: String,
    pub channel: String,
    pub accepted: i32,
    pub duplicates: i32,
    /// Rejected messages by reason.
    pub rejected: Vec<ReasonCount>,
    /// Accepted messages with something ignored, by reason (blocked identity values, invalid emails…).
    pub warnings: Vec<ReasonCount>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

#[derive(SimpleObject, InputObject, Clone, Debug)]
#[graphql(input_name = "IdentityRuleInput")]
pub struct IdentityRule {
    /// user_id, anonymous_id, email, phone, or a custom kind from context.externalIds.
    pub kind: String,
    /// Higher wins when identifiers conflict.
    pub priority: i32,
    /// At most this many identifiers of the kind per profile.
    pub limit: i32,
}

/// A tenant's ingestion settings.
#[derive(SimpleObject, InputObject, Clone, Debug)]
#[graphql(input_name = "IngestSettingsInput")]
pub struct IngestSettings {
    pub max_message_bytes: i32,
    pub max_request_bytes: i32,
    pub max_batch_messages: i32,
    /// Messages per second per tenant and per source; 0 for no limit.
    pub rate_limit_per_second: i32,
    /// ISO 3166 region for phone numbers written without a country code.
    pub default_region: Option<String>,
    /// Values never treated as identities, besides the built-in ones.
    pub blocked_identity_values: Vec<String>,
    /// Rules for custom kinds not listed fall back to priority 50, limit 5.
    pub identity_rules: Vec<IdentityRule>,
}

impl From<settings::IngestSettings> for IngestSettings {
    fn from(value: settings::IngestSettings) -> Self {
        let clamp = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        IngestSettings {
            max_message_bytes: clamp(value.max_message_bytes),
            max_request_bytes: clamp(value.max_request_bytes),
            max_batch_messages: clamp(value.max_batch_messages),
            rate_limit_per_second: i32::try_from(value.rate_limit_per_second).unwrap_or(i32::MAX),
            default_region: value.default_region,
            blocked_identity_values: value.blocked_identity_values,
            identity_rules: value
                .identity_rules
                .kinds
                .iter()
                .map(|(kind, rule)| IdentityRule {
                    kind: kind.clone(),
                    priority: i32::try_from(rule.priority).unwrap_or(i32::MAX),
                    limit: clamp(rule.limit),
                })
                .collect(),
        }
    }
}

fn to_settings(
    input: IngestSettings,
) -> std::result::Result<settings::IngestSettings, ServiceError> {
    let positive = |value: i32, field: &str| {
        usize::try_from(value).map_err(|_| {
            ServiceError::bad_input(
                format!("input.{field}"),
                format!("{field} must not be negative"),
            )
        })
    };
    let mut rules = domain::identity::IdentityRules::default();
    for (index, rule) in input.identity_rules.iter().enumerate() {
        let kind = rule.kind.trim().to_lowercase();
        rules.kinds.insert(
            kind,
            domain::identity::KindRule {
                priority: u32::try_from(rule.priority).map_err(|_| {
                    ServiceError::bad_input(
                        format!("input.identityRules[{index}].priority"),
                        "priority must not be negative",
                    )
                })?,
                limit: positive(rule.limit, &format!("identityRules[{index}].limit"))?,
            },
        );
    }
    Ok(settings::IngestSettings {
        max_message_bytes: positive(input.max_message_bytes, "maxMessageBytes")?,
        max_request_bytes: positive(input.max_request_bytes, "maxRequestBytes")?,
        max_batch_messages: positive(input.max_batch_messages, "maxBatchMessages")?,
        rate_limit_per_second: u32::try_from(input.rate_limit_per_second).map_err(|_| {
            ServiceError::bad_input("input.rateLimitPerSecond", "must not be negative")
        })?,
        default_region: input
            .default_region
            .and_then(|region| domain::ingest::normalize_region(&region).or(Some(region))),
        blocked_identity_values: input.blocked_identity_values,
        identity_rules: rules,
    })
}

#[derive(Default)]
pub struct CustomersQuery;

#[Object]
impl CustomersQuery {
    async fn profile(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Profile>> {
        let env = Env::of(ctx)?;
        Ok(profiles::get(env.state, env.principal()?, &id)
            .await
            .gql()?
            .map(Profile::from))
    }

    /// kind: user_id | anonymous_id | email | phone | any custom external id kind
    async fn profile_by_identity(
        &self,
        ctx: &Context<'_>,
        kind: String,
        value: String,
    ) -> Result<Option<Profile>> {
        let env = Env::of(ctx)?;
        Ok(
            profiles::by_identity(env.state, env.principal()?, &kind, &value)
                .await
                .gql()?
                .map(Profile::from),
        )
    }

    async fn profiles(
        &self,
        ctx: &Context<'_>,
        filter: Option<ProfileFilter>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<ProfileConnection> {
        let env = Env::of(ctx)?;
        let filter = filter.unwrap_or_default();
        let filter = profiles::ProfileFilter {
            segment_id: filter.segment_id.map(|id| id.0),
            stage: filter.stage,
            trait_equals: filter.trait_equals.map(|json| json.0),
            seen_after: filter.seen_after,
            seen_before: filter.seen_before,
        };
        // The total is counted only when asked: it reads every matching profile of the tenant.
        let count_total = ctx.look_ahead().field("totalCount").exists();
        profiles::list(
            env.state,
            env.principal()?,
            filter,
            first,
            after.as_deref(),
            count_total,
        )
        .await
        .gql()
        .map(ProfileConnection::from)
    }

    async fn events(
        &self,
        ctx: &Context<'_>,
        profile_id: Option<ID>,
        name: Option<String>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<EventConnection> {
        let env = Env::of(ctx)?;
        let owner = match &profile_id {
            Some(id) => profiles::EventOwner::Id(id.as_str()),
            None => profiles::EventOwner::Anyone,
        };
        profiles::events(
            env.state,
            env.principal()?,
            owner,
            name,
            first,
            after.as_deref(),
            event_page_wants(ctx),
        )
        .await
        .gql()
        .map(EventConnection::from)
    }

    /// Per source: accepted, duplicate and rejected messages by reason. The first view an admin checks.
    async fn data_quality(&self, ctx: &Context<'_>) -> Result<Vec<SourceQuality>> {
        let env = Env::of(ctx)?;
        let count = |n: i64| i32::try_from(n).unwrap_or(i32::MAX);
        Ok(profiles::data_quality(env.state, env.principal()?)
            .await
            .gql()?
            .into_iter()
            .map(|source| SourceQuality {
                source_id: source.source_id.map(|id| ID(id.to_string())),
                name: source.name,
                channel: source.channel,
                accepted: count(source.accepted),
                duplicates: count(source.duplicates),
                rejected: source
                    .rejected
                    .into_iter()
                    .map(|(reason, n)| ReasonCount {
                        reason,
                        count: count(n),
                    })
                    .collect(),
                warnings: source
                    .warnings
                    .into_iter()
                    .map(|(reason, n)| ReasonCount {
                        reason,
                        count: count(n),
                    })
                    .collect(),
                last_seen_at: source.last_seen_at,
            })
            .collect())
    }

    /// The tenant's ingestion settings (API_KEYS_MANAGE).
    async fn ingest_settings(&self, ctx: &Context<'_>) -> Result<IngestSettings> {
        let env = Env::of(ctx)?;
        settings::get(env.state, env.principal()?)
            .await
            .gql()
            .map(IngestSettings::from)
    }
}

#[derive(Default)]
pub struct CustomersMutation;

/// Sends one message through the ingestion write path and returns what became of it.
async fn send_one(
    env: &Env<'_>,
    message: Value,
) -> Result<(uuid::Uuid, uuid::Uuid, Option<String>)> {
    let principal = crate::service::auth::require(env.principal()?).gql()?;
    if !principal.can_ingest() {
        return Err(super::service_error(ServiceError::Forbidden(
            "this operation needs the PROFILES_WRITE permission or an api key".to_owned(),
        )));
    }
    let source = ingest::Source {
        key_id: principal.source().map(|(key_id, _)| key_id.as_uuid()),
        channel: principal
            .source()
            .map(|(_, channel)| channel)
            .unwrap_or(domain::ingest::Channel::Server),
    };
    let batch = ingest::Batch {
        messages: vec![message],
        sent_at: None,
        context: None,
        received_at: env.state.now(),
    };
    let report = ingest::ingest(env.state, principal.tenant_id, &source, batch)
        .await
        .gql()?;
    let Some(result) = report.messages.into_iter().next() else {
        return Err(super::service_error(ServiceError::Unexpected(
            anyhow::anyhow!("ingest returned no outcome"),
        )));
    };
    match result.outcome {
        Outcome::Accepted {
            profile_id,
            event_id,
        } => Ok((profile_id, event_id, result.message_id)),
        Outcome::Duplicate => {
            let message_id = result.message_id.unwrap_or_default();
            let event = profiles::event_by_message_id(env.state, principal, &message_id)
                .await
                .gql()?
                .ok_or_else(|| super::service_error(ServiceError::NotFound("event")))?;
            Ok((event.profile_id, event.id, Some(message_id)))
        }
        Outcome::Rejected(rejection) => {
            Err(super::service_error(ingest::rejection_error(&rejection)))
        }
    }
}

fn message(kind: &str, fields: Vec<(&str, Option<Value>)>) -> Value {
    let mut object = serde_json::Map::new();
    object.insert("type".to_owned(), json!(kind));
    for (key, value) in fields {
        if let Some(value) = value {
            object.insert(key.to_owned(), value);
        }
    }
    Value::Object(object)
}

#[Object]
impl CustomersMutation {
    /// Records traits of a person (the same write path as POST /v1/identify).
    async fn identify(&self, ctx: &Context<'_>, input: IdentifyInput) -> Result<Profile> {
        let env = Env::of(ctx)?;
        let raw = message(
            "identify",
            vec![
                ("userId", input.user_id.map(Value::String)),
                ("anonymousId", input.anonymous_id.map(Value::String)),
                ("traits", input.traits.map(|json| json.0)),
                ("timestamp", input.timestamp.map(|at| json!(at))),
                ("messageId", input.message_id.map(Value::String)),
                ("context", input.context.map(|json| json.0)),
            ],
        );
        let (profile_id, _, _) = send_one(&env, raw).await?;
        profiles::get(env.state, env.principal()?, &profile_id.to_string())
            .await
            .gql()?
            .map(Profile::from)
            .ok_or_else(|| super::service_error(ServiceError::NotFound("profile")))
    }

    /// Records an event (the same write path as POST /v1/track).
    async fn track(&self, ctx: &Context<'_>, input: TrackInput) -> Result<Event> {
        let env = Env::of(ctx)?;
        let raw = message(
            "track",
            vec![
                ("userId", input.user_id.map(Value::String)),
                ("anonymousId", input.anonymous_id.map(Value::String)),
                ("event", Some(Value::String(input.event))),
                ("properties", input.properties.map(|json| json.0)),
                ("timestamp", input.timestamp.map(|at| json!(at))),
                ("messageId", input.message_id.map(Value::String)),
                ("context", input.context.map(|json| json.0)),
            ],
        );
        let (_, _, message_id) = send_one(&env, raw).await?;
        let principal = crate::service::auth::require(env.principal()?).gql()?;
        profiles::event_by_message_id(env.state, principal, &message_id.unwrap_or_default())
            .await
            .gql()?
            .map(Event::from)
            .ok_or_else(|| super::service_error(ServiceError::NotFound("event")))
    }

    /// Moves every identity, event and trait of mergeId into keepId; mergeId then resolves to keepId.
    async fn merge_profiles(
        &self,
        ctx: &Context<'_>,
        keep_id: ID,
        merge_id: ID,
    ) -> Result<Profile> {
        let env = Env::of(ctx)?;
        profiles::merge(env.state, env.principal()?, env.meta(), &keep_id, &merge_id)
            .await
            .gql()
            .map(Profile::from)
    }

    /// Undoes a wrong merge: moves one identity, and the events that arrived under it, to a new profile.
    async fn split_identity(
        &self,
        ctx: &Context<'_>,
        profile_id: ID,
        kind: String,
        value: String,
    ) -> Result<Profile> {
        let env = Env::of(ctx)?;
        profiles::split(
            env.state,
            env.principal()?,
            env.meta(),
            &profile_id,
            &kind,
            &value,
        )
        .await
        .gql()
        .map(Profile::from)
    }

    async fn set_consent(
        &self,
        ctx: &Context<'_>,
        profile_id: ID,
        purpose: String,
        granted: bool,
    ) -> Result<Profile> {
        let env = Env::of(ctx)?;
        profiles::set_consent(
            env.state,
            env.principal()?,
            env.meta(),
            &profile_id,
            &purpose,
            granted,
        )
        .await
        .gql()
        .map(Profile::from)
    }

    /// Replaces the tenant's ingestion settings (API_KEYS_MANAGE).
    async fn update_ingest_settings(
        &self,
        ctx: &Context<'_>,
        input: IngestSettings,
    ) -> Result<IngestSettings> {
        let env = Env::of(ctx)?;
        let settings = to_settings(input).gql()?;
        settings::update(env.state, env.principal()?, env.meta(), settings)
            .await
            .gql()
            .map(IngestSettings::from)
    }
}

#[cfg(test)]
mod tests {
    //! Statement counts of the read path, from the store's own counter: a page of profiles must
    //! cost the same statements whatever its size (no query per profile).

    use std::sync::Arc;

    use async_graphql::Request;

    use crate::config::Config;
    use crate::graphql::{build_schema, RequestContext};
    use crate::service::{accounts, auth, RequestMeta, SystemClock};

    macro_rules! profile_fields {
        () => {
            "id traits eventCount lastSeenAt firstSeenAt channels identities { kind value } \
            stage segments { id } consents { purpose } mergedIds groups { groupId } \
            attributes { orderCount } events(first: 2) { totalCount edges { node { type } } }"
        };
    }

    /// The fields `cdp-bench read` asks of a page, and the fields that other tables answer
    /// (batched by the request's loader).
    const PAGE: &str = concat!(
        "{ profiles(first: 50) { edges { node { ",
        profile_fields!(),
        " } } pageInfo { hasNextPage endCursor } } }"
    );

    /// Statements of one `profiles` page of a tenant holding `profiles` profiles (the fewest of
    /// three runs, so that nothing else the process does is counted). Also checks that each
    /// profile of the page reads as `profile(id)` reads it alone (the batched and the direct
    /// loads agree).
    async fn statements_of_a_page(profiles: usize) -> u64 {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("cdp.db").display());
        let state =
            crate::startup::state(Config::for_tests(dir.path(), &url), Arc::new(SystemClock))
                .await
                .expect("the state");
        let schema = build_schema(state.clone(), &state.config.graphql, &state.config.abuse);
        let meta = RequestMeta::default();
        let (_tenant, _user, token) = accounts::sign_up(
            &state,
            &meta,
            accounts::SignUpCommand {
                tenant_name: "Counting Inc".to_owned(),
                tenant_slug: "counting".to_owned(),
                email: "owner@counting.example".to_owned(),
            },
        )
        .await
        .expect("sign-up");
        let session =
            accounts::activate_account(&state, &meta, &token, "correct horse battery staple")
                .await
                .expect("activation");
        let principal = auth::authenticate_bearer(&state, &session.access_token)
            .await
            .expect("a principal");
        let context = || RequestContext {
            principal: Some(principal.clone()),
            auth_error: None,
            meta: RequestMeta::default(),
            loaders: Default::default(),
        };
        for n in 0..profiles {
            let identify = format!(
                r#"mutation {{ identify(input: {{userId: "u{n}", traits: {{plan: "pro", score: {n}, email: "u{n}@example.com"}}}}) {{ id }} }}"#
            );
            let response = schema.execute(Request::new(identify).data(context())).await;
            assert!(response.errors.is_empty(), "{:?}", response.errors);
        }
        let mut fewest = u64::MAX;
        for _ in 0..3 {
            let before = state.store.statements_executed();
            let response = schema.execute(Request::new(PAGE).data(context())).await;
            let counted = state.store.statements_executed() - before;
            assert!(response.errors.is_empty(), "{:?}", response.errors);
            let data = response.data.into_json().expect("JSON data");
            let edges = data["profiles"]["edges"].as_array().map_or(0, Vec::len);
            assert_eq!(edges, profiles);
            fewest = fewest.min(counted);
            for edge in data["profiles"]["edges"].as_array().into_iter().flatten() {
                let node = &edge["node"];
                assert_eq!(node["identities"].as_array().map(Vec::len), Some(2));
                assert_eq!(node["events"]["totalCount"], 1);
                let alone = format!(
                    "{{ profile(id: \"{}\") {{ {} }} }}",
                    node["id"].as_str().expect("an id"),
                    profile_fields!()
                );
                let response = schema.execute(Request::new(alone).data(context())).await;
                assert!(response.errors.is_empty(), "{:?}", response.errors);
                let data = response.data.into_json().expect("JSON data");
                assert_eq!(&data["profile"], node);
            }
        }
        fewest
    }

    #[tokio::test]
    async fn a_profiles_page_runs_as_many_statements_for_thirty_profiles_as_for_three() {
        let three = statements_of_a_page(3).await;
        let thirty = statements_of_a_page(30).await;
        assert!(three > 0, "the counter counts nothing");
        assert_eq!(
            three, thirty,
            "a page of 30 ran {thirty} statements, a page of 3 ran {three}"
        );
    }
}
