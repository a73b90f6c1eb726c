//! Campaigns: emails triggered by a segment entry, a lifecycle stage, an event, or broadcast to a
//! segment's current members; their templates, consent, suppression, frequency cap and one-click
//! unsubscribe.
//!
//! Guarantees: a campaign email is queued in the transaction of the change that triggers it
//! ([`trigger`], called by `reactions::react` before every commit; the broadcast in
//! `setCampaignStatus`'s own transaction), so a rolled-back change emails nobody; one email per
//! (campaign, profile); an email goes out only if the profile granted the campaign's consent
//! purpose when it was queued and still does when it is sent. Templates are checked when a
//! campaign is saved; at send time a missing trait renders empty. A rendered subject never holds
//! a line break, and every campaign email carries a signed one-click unsubscribe link (RFC 8058).

use std::collections::BTreeSet;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use domain::{Permission, TenantId};
use hmac::{Hmac, Mac};
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use uuid::Uuid;

use super::auth::require_permission;
use super::bus::Notice;
use super::pagination::{build_page, decode_cursor, page_size, Page};
use super::vault::TenantKeys;
use super::{audit, profiles, AppState, RequestMeta, ServiceError, ServiceResult};
use crate::auth::Principal;
use crate::config::Config;
use crate::mail::OutgoingEmail;
use crate::store::campaigns::{self as stored, Audience, CampaignDraft, CampaignRow};
use crate::store::outbox::OutboxRow;
use crate::store::{self, Backend, StoreResult, TenantTx};

const MAX_NAME: usize = 100;
/// The largest template (subject, text or HTML body) accepted, in bytes.
const MAX_TEMPLATE: usize = 256 * 1024;
const MAX_SUBJECT: usize = 998;
/// The consent purpose of a campaign that names none.
pub const DEFAULT_PURPOSE: &str = "email_marketing";
/// Campaign emails a profile may get in any 24 hours unless the tenant says otherwise.
pub const DEFAULT_DAILY_CAP: u32 = 3;
/// A broadcast publishes a notice for at most this many of its emails (the bus's capacity);
/// `emailDeliveries` lists them all.
const BROADCAST_NOTICES: u64 = crate::service::bus::CAPACITY as u64;
/// Profiles per queuing statement of a trigger.
const CHUNK: usize = 1000;
/// How long an email of a paused campaign waits before the worker looks at it again.
pub const PAUSED_RETRY: chrono::Duration = chrono::Duration::minutes(1);

/// What starts a campaign's emails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    SegmentEntered(Uuid),
    StageEntered(String),
    Event(String),
    BroadcastSegment(Uuid),
}

impl Trigger {
    /// The contract's name of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Trigger::SegmentEntered(_) => "segmentEntered",
            Trigger::StageEntered(_) => "stageEntered",
            Trigger::Event(_) => "event",
            Trigger::BroadcastSegment(_) => "broadcastSegment",
        }
    }

    fn of(row: &CampaignRow) -> Option<Trigger> {
        match row.trigger_kind.as_str() {
            "segmentEntered" => row.segment_id.map(Trigger::SegmentEntered),
            "stageEntered" => row.stage.clone().map(Trigger::StageEntered),
            "event" => row.event.clone().map(Trigger::Event),
            "broadcastSegment" => row.segment_id.map(Trigger::BroadcastSegment),
            _ => None,
        }
    }

    pub fn segment_id(&self) -> Option<Uuid> {
        match self {
            Trigger::SegmentEntered(id) | Trigger::BroadcastSegment(id) => Some(*id),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Draft,
    Active,
    Paused,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => stored::DRAFT,
            Status::Active => stored::ACTIVE,
            Status::Paused => stored::PAUSED,
        }
    }

    fn parse(text: &str) -> Status {
        match text {
            stored::ACTIVE => Status::Active,
            stored::PAUSED => Status::Paused,
            _ => Status::Draft,
        }
    }
}

/// A campaign as callers see it.
#[derive(Debug, Clone)]
pub struct Campaign {
    pub id: Uuid,
    pub name: String,
    pub status: Status,
    pub trigger: Trigger,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
    pub consent_purpose: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

fn campaign_from_row(row: CampaignRow) -> StoreResult<Campaign> {
    let trigger = Trigger::of(&row)
        .ok_or_else(|| store::StoreError::corrupt(format!("campaign {} has no trigger", row.id)))?;
    Ok(Campaign {
        id: row.id,
        name: row.name,
        status: Status::parse(&row.status),
        trigger,
        subject: row.subject,
        text_body: row.text_body,
        html_body: row.html_body,
        consent_purpose: row.consent_purpose,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

/// The trigger as submitted: exactly one field is set.
#[derive(Debug, Clone, Default)]
pub struct TriggerInput {
    pub segment_entered: Option<String>,
    pub stage_entered: Option<String>,
    pub event: Option<String>,
    pub broadcast_segment: Option<String>,
}

/// What a caller submits.
#[derive(Debug, Clone)]
pub struct CampaignInput {
    pub name: String,
    pub trigger: TriggerInput,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
    pub consent_purpose: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryStats {
    pub queued: u64,
    pub sent: u64,
    pub failed: u64,
    pub suppressed: u64,
}

/// One campaign email, its address masked for principals without PII_READ.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: Uuid,
    pub campaign_id: Option<Uuid>,
    pub profile_id: Option<Uuid>,
    pub to: String,
    /// QUEUED, SENT, FAILED or SUPPRESSED.
    pub status: &'static str,
    pub suppression_reason: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

fn delivery_from_row(row: OutboxRow, reveal: &profiles::Reveal) -> Delivery {
    // The address is the profile's email identity, sealed under its data key; empty (or
    // unreadable after an erasure) stays empty.
    let to = if row.to_address.is_empty() {
        String::new()
    } else {
        reveal.identity(domain::identity::EMAIL, &row.to_address)
    };
    Delivery {
        id: row.id,
        campaign_id: row.campaign_id,
        profile_id: row.profile_id,
        to,
        status: stored::delivery_status(&row.status),
        suppression_reason: row.suppression_reason,
        attempts: row.attempts,
        last_error: row.last_error,
        sent_at: row.sent_at,
        created_at: row.created_at,
    }
}

// ---------------- templates ----------------

/// The template environment: HTML bodies are autoescaped, subjects and text bodies are not; an
/// undefined value (a missing trait, even a missing trait's attribute) renders empty.
fn environment(html: bool) -> Environment<'static> {
    let mut environment = Environment::new();
    environment.set_undefined_behavior(UndefinedBehavior::Chainable);
    environment.set_auto_escape_callback(move |_| {
        if html {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    environment
}

fn template_context(profile_id: Uuid, traits: &Value, unsubscribe_url: &str) -> minijinja::Value {
    minijinja::Value::from(minijinja::value::Serde(json!({
        "profile": {"id": profile_id.to_string(), "traits": traits},
        "unsubscribe_url": unsubscribe_url,
    })))
}

/// Renders one template.
pub fn render(source: &str, html: bool, context: &minijinja::Value) -> Result<String, String> {
    environment(html)
        .render_str(source, context)
        .map_err(|error| error.to_string())
}

/// Checks that a template compiles and renders for a profile without traits (which catches
/// unknown filters and tests as well as syntax errors).
fn check_template(field: &str, source: &str, html: bool) -> ServiceResult<()> {
    if source.len() > MAX_TEMPLATE {
        return Err(ServiceError::bad_input(
            field,
            format!("{field} must be at most {MAX_TEMPLATE} bytes"),
        ));
    }
    let environment = environment(html);
    let template = environment.template_from_str(source).map_err(|error| {
        ServiceError::bad_input(field, format!("{field} is not a valid template: {error}"))
    })?;
    let context = template_context(
        Uuid::nil(),
        &json!({}),
        "https://example.invalid/unsubscribe",
    );
    template.render(context).map_err(|error| {
        ServiceError::bad_input(field, format!("{field} does not render: {error}"))
    })?;
    Ok(())
}

/// A subject has no line break: a header cannot be injected through it.
fn one_line(text: &str) -> String {
    text.split(['\r', '\n'])
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------- validation ----------------

fn parse_id(id: &str) -> ServiceResult<Uuid> {
    Uuid::parse_str(id.trim()).map_err(|_| ServiceError::NotFound("campaign"))
}

fn short_text(field: &str, value: &str) -> ServiceResult<String> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > MAX_NAME || value.chars().any(char::is_control) {
        return Err(ServiceError::bad_input(
            field,
            format!("{field} must be 1 to {MAX_NAME} characters without control characters"),
        ));
    }
    Ok(value.to_owned())
}

async fn validate(tx: &TenantTx, input: &CampaignInput) -> ServiceResult<CampaignDraft> {
    let name = short_text("input.name", &input.name)?;
    let given = [
        input.trigger.segment_entered.is_some(),
        input.trigger.stage_entered.is_some(),
        input.trigger.event.is_some(),
        input.trigger.broadcast_segment.is_some(),
    ];
    if given.iter().filter(|set| **set).count() != 1 {
        return Err(ServiceError::bad_input(
            "input.trigger",
            "exactly one of segmentEntered, stageEntered, event and broadcastSegment must be set",
        ));
    }
    let segment = |field: &'static str, id: &str| {
        let field = field.to_owned();
        let id = id.to_owned();
        async move {
            let unknown = || ServiceError::bad_input(&field, format!("{field}: no such segment"));
            let id = Uuid::parse_str(id.trim()).map_err(|_| unknown())?;
            store::segments::get(tx, id).await?.ok_or_else(unknown)?;
            Ok::<Uuid, ServiceError>(id)
        }
    };
    let trigger = if let Some(id) = &input.trigger.segment_entered {
        Trigger::SegmentEntered(segment("input.trigger.segmentEntered", id).await?)
    } else if let Some(id) = &input.trigger.broadcast_segment {
        Trigger::BroadcastSegment(segment("input.trigger.broadcastSegment", id).await?)
    } else if let Some(stage) = &input.trigger.stage_entered {
        Trigger::StageEntered(short_text("input.trigger.stageEntered", stage)?)
    } else {
        let event = input.trigger.event.as_deref().unwrap_or_default();
        Trigger::Event(short_text("input.trigger.event", event)?)
    };
    if input.subject.contains(['\r', '\n']) {
        return Err(ServiceError::bad_input(
            "input.subject",
            "the subject must be one line (no CR or LF)",
        ));
    }
    if input.subject.trim().is_empty() || input.subject.len() > MAX_SUBJECT {
        return Err(ServiceError::bad_input(
            "input.subject",
            format!("the subject must be 1 to {MAX_SUBJECT} bytes"),
        ));
    }
    check_template("input.subject", &input.subject, false)?;
    if input.text_body.trim().is_empty() {
        return Err(ServiceError::bad_input(
            "input.textBody",
            "the text body must not be empty",
        ));
    }
    check_template("input.textBody", &input.text_body, false)?;
    let html_body = input
        .html_body
        .as_deref()
        .filter(|html| !html.trim().is_empty());
    if let Some(html) = html_body {
        check_template("input.htmlBody", html, true)?;
    }
    let consent_purpose = short_text(
        "input.consentPurpose",
        input.consent_purpose.as_deref().unwrap_or(DEFAULT_PURPOSE),
    )?;
    // A purpose the tenant does not know is a typo that would silently email nobody (or, worse,
    // email people on a consent they never gave): refused.
    let privacy = super::privacy::settings_in(tx).await?;
    if !privacy.has_purpose(&consent_purpose) {
        return Err(ServiceError::bad_input(
            "input.consentPurpose",
            format!(
                "{consent_purpose:?} is not one of the tenant's consent purposes ({}); add it with setPrivacySettings first",
                privacy.consent_purposes.join(", ")
            ),
        ));
    }
    let (segment_id, stage, event) = match &trigger {
        Trigger::SegmentEntered(id) | Trigger::BroadcastSegment(id) => (Some(*id), None, None),
        Trigger::StageEntered(stage) => (None, Some(stage.clone()), None),
        Trigger::Event(event) => (None, None, Some(event.clone())),
    };
    Ok(CampaignDraft {
        name,
        trigger_kind: trigger.kind().to_owned(),
        segment_id,
        stage,
        event,
        subject: input.subject.clone(),
        text_body: input.text_body.clone(),
        html_body: html_body.map(str::to_owned),
        consent_purpose,
    })
}

// ---------------- use cases ----------------

pub async fn list(state: &AppState, principal: Option<&Principal>) -> ServiceResult<Vec<Campaign>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(stored::list(&tx)
        .await?
        .into_iter()
        .map(campaign_from_row)
        .collect::<StoreResult<_>>()?)
}

pub async fn get(
    state: &AppState,
    principal: Option<&Principal>,
    id: &str,
) -> ServiceResult<Option<Campaign>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let Ok(id) = Uuid::parse_str(id.trim()) else {
        return Ok(None);
    };
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(stored::get(&tx, id)
        .await?
        .map(campaign_from_row)
        .transpose()?)
}

pub async fn stats(
    state: &AppState,
    principal: Option<&Principal>,
    id: Uuid,
) -> ServiceResult<DeliveryStats> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let mut stats = DeliveryStats::default();
    for (status, count) in stored::stats(&tx, id).await? {
        let count = u64::try_from(count).unwrap_or(0);
        match stored::delivery_status(&status) {
            store::outbox::SENT => stats.sent += count,
            store::outbox::FAILED => stats.failed += count,
            store::outbox::SUPPRESSED => stats.suppressed += count,
            _ => stats.queued += count,
        }
    }
    Ok(stats)
}

pub async fn create(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    input: CampaignInput,
) -> ServiceResult<Campaign> {
    let principal = require_permission(principal, Permission::CampaignsManage)?;
    let now = state.now();
    let tx = state.store.begin(principal.tenant_id).await?;
    let draft = validate(&tx, &input).await?;
    let id = Uuid::now_v7();
    let detail = json!({"name": draft.name, "trigger": draft.trigger_kind});
    let row = stored::insert(&tx, id, draft, now).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "campaign.create",
        Some(&format!("campaign:{id}")),
        Some(detail),
    )
    .await?;
    tx.commit().await?;
    Ok(campaign_from_row(row)?)
}

/// Replaces a DRAFT or PAUSED campaign's definition (an ACTIVE one must be paused first, so that
/// no email is queued against a definition that is being changed).
pub async fn update(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    id: &str,
    input: CampaignInput,
) -> ServiceResult<Campaign> {
    let principal = require_permission(principal, Permission::CampaignsManage)?;
    let id = parse_id(id)?;
    let now = state.now();
    let tx = state.store.begin(principal.tenant_id).await?;
    let existing = stored::get(&tx, id)
        .await?
        .ok_or(ServiceError::NotFound("campaign"))?;
    if existing.status == stored::ACTIVE {
        return Err(ServiceError::Conflict(
            "an ACTIVE campaign cannot be changed; pause it first".to_owned(),
        ));
    }
    let draft = validate(&tx, &input).await?;
    let detail = json!({"name": draft.name, "trigger": draft.trigger_kind});
    stored::update(&tx, id, draft, now).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "campaign.update",
        Some(&format!("campaign:{id}")),
        Some(detail),
    )
    .await?;
    let row = stored::get(&tx, id)
        .await?
        .ok_or(ServiceError::NotFound("campaign"))?;
    tx.commit().await?;
    Ok(campaign_from_row(row)?)
}

/// Moves a campaign between DRAFT, ACTIVE and PAUSED (never back to DRAFT). Activating a
/// broadcast queues its email for every current member of the segment, in this transaction.
pub async fn set_status(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    id: &str,
    status: Status,
) -> ServiceResult<Campaign> {
    let principal = require_permission(principal, Permission::CampaignsManage)?;
    let id = parse_id(id)?;
    let now = state.now();
    let backend = state.store.backend();
    let tx = state.store.begin(principal.tenant_id).await?;
    let existing = stored::get(&tx, id)
        .await?
        .ok_or(ServiceError::NotFound("campaign"))?;
    let current = Status::parse(&existing.status);
    if status == Status::Draft && current != Status::Draft {
        return Err(ServiceError::bad_input(
            "status",
            "a campaign that was activated cannot go back to DRAFT",
        ));
    }
    let mut notices = Vec::new();
    if status != current {
        stored::set_status(&tx, id, status.as_str(), now).await?;
        if status == Status::Active {
            if let Some(Trigger::BroadcastSegment(segment_id)) = Trigger::of(&existing) {
                // Shared, like a write batch: a build of the segment finishes first.
                store::segments::barrier(&tx, backend, false).await?;
                let segment = store::segments::get(&tx, segment_id)
                    .await?
                    .ok_or_else(|| {
                        ServiceError::Conflict("the campaign's segment no longer exists".to_owned())
                    })?;
                if segment.status != store::segments::STATUS_READY {
                    return Err(ServiceError::Conflict(
                        "the campaign's segment is still building; try again when it is ready"
                            .to_owned(),
                    ));
                }
                let cap = daily_cap(&tx).await?;
                let ids = stored::queue(
                    &tx,
                    backend,
                    &existing,
                    Audience::SegmentMembers(segment_id),
                    cap,
                    now,
                    BROADCAST_NOTICES,
                )
                .await?;
                notices.extend(ids.into_iter().map(|(delivery_id, status)| {
                    Notice::EmailDelivery {
                        tenant_id: principal.tenant_id,
                        delivery_id,
                        campaign_id: Some(id),
                        status,
                    }
                }));
            }
        }
        audit::record(
            state,
            &tx,
            meta,
            &principal.actor(),
            "campaign.status",
            Some(&format!("campaign:{id}")),
            Some(json!({"from": current.as_str(), "to": status.as_str()})),
        )
        .await?;
    }
    let reactions = super::reactions::react(&tx, backend, None, &notices, now).await?;
    let row = stored::get(&tx, id)
        .await?
        .ok_or(ServiceError::NotFound("campaign"))?;
    tx.commit().await?;
    state.bus.publish(notices);
    state.bus.publish(reactions);
    Ok(campaign_from_row(row)?)
}

/// Campaign emails, newest decisions last, in id order; by campaign and/or profile.
pub async fn deliveries(
    state: &AppState,
    principal: Option<&Principal>,
    campaign_id: Option<&str>,
    profile_id: Option<&str>,
    first: Option<i32>,
    after: Option<&str>,
) -> ServiceResult<Page<Delivery>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let limit = page_size(first)?;
    let after = decode_cursor(after)?;
    let empty = || Page {
        items: Vec::new(),
        has_next_page: false,
        total_count: Some(0),
    };
    let parse = |id: Option<&str>| match id {
        None => Ok(None),
        Some(id) => Uuid::parse_str(id.trim()).map(Some),
    };
    let (Ok(campaign_id), Ok(profile_id)) = (parse(campaign_id), parse(profile_id)) else {
        return Ok(empty());
    };
    let filter = stored::DeliveryFilter {
        campaign_id,
        profile_id,
    };
    let tx = state.store.read(principal.tenant_id).await?;
    let rows = stored::delivery_page(&tx, filter, after, limit + 1).await?;
    let total = stored::delivery_count(&tx, filter).await?;
    let reveal = profiles::Reveal::load(
        state,
        &tx,
        profiles::masks(principal),
        [],
        rows.iter().map(|row| row.to_address.as_str()),
    )
    .await?;
    Ok(build_page(
        rows,
        limit,
        Some(total),
        |row| row.id,
        |row| delivery_from_row(row, &reveal),
    ))
}

/// One campaign email by id (for subscriptions); None for another tenant's or an account email.
pub async fn delivery(
    state: &AppState,
    principal: Option<&Principal>,
    id: Uuid,
) -> ServiceResult<Option<Delivery>> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let Some(row) = stored::delivery(&tx, id)
        .await?
        .filter(|row| row.campaign_id.is_some())
    else {
        return Ok(None);
    };
    let reveal = profiles::Reveal::load(
        state,
        &tx,
        profiles::masks(principal),
        [],
        [row.to_address.as_str()],
    )
    .await?;
    Ok(Some(delivery_from_row(row, &reveal)))
}

/// A campaign email as a notice announced it: the row read now, with the announced status (the
/// outbox worker may have sent it since a QUEUED notice was published; a subscriber still sees
/// each status in order). `sentAt` belongs to the SENT status only.
pub async fn announced_delivery(
    state: &AppState,
    principal: Option<&Principal>,
    id: Uuid,
    status: &'static str,
) -> ServiceResult<Option<Delivery>> {
    Ok(delivery(state, principal, id).await?.map(|mut delivery| {
        delivery.status = status;
        if status != crate::store::outbox::SENT {
            delivery.sent_at = None;
        }
        delivery
    }))
}

// ---------------- triggers ----------------

/// Queues the campaign emails that `notices` trigger, in the caller's transaction: a segment
/// entry for `segmentEntered`, a transition into the stage for `stageEntered`, a stored event of
/// the name for `event`. Returns a notice for every email queued or suppressed.
pub async fn trigger(
    tx: &TenantTx,
    backend: Backend,
    active: Option<&[CampaignRow]>,
    notices: &[Notice],
    now: DateTime<Utc>,
) -> StoreResult<Vec<Notice>> {
    let tenant_id = tx.tenant_id();
    let may_trigger = notices.iter().any(|notice| {
        notice.tenant_id() == tenant_id
            && matches!(
                notice,
                Notice::SegmentMembership { entered: true, .. }
                    | Notice::StageTransition { to: Some(_), .. }
                    | Notice::EventIngested { name: Some(_), .. }
            )
    });
    if !may_trigger {
        return Ok(Vec::new());
    }
    let read;
    let campaigns = match active {
        Some(active) => active,
        None => {
            read = stored::active(tx).await?;
            read.as_slice()
        }
    };
    let mut cap = None;
    let mut out = Vec::new();
    for campaign in campaigns {
        let Some(trigger) = Trigger::of(campaign) else {
            continue;
        };
        let profile_ids: BTreeSet<Uuid> = notices
            .iter()
            .filter(|notice| notice.tenant_id() == tenant_id)
            .filter_map(|notice| match (&trigger, notice) {
                (
                    Trigger::SegmentEntered(wanted),
                    Notice::SegmentMembership {
                        segment_id,
                        profile_id,
                        entered: true,
                        ..
                    },
                ) if segment_id == wanted => Some(*profile_id),
                (
                    Trigger::StageEntered(wanted),
                    Notice::StageTransition {
                        profile_id,
                        to: Some(to),
                        ..
                    },
                ) if to == wanted => Some(*profile_id),
                (
                    Trigger::Event(wanted),
                    Notice::EventIngested {
                        profile_id,
                        name: Some(name),
                        ..
                    },
                ) if name == wanted => Some(*profile_id),
                _ => None,
            })
            .collect();
        if profile_ids.is_empty() {
            continue;
        }
        let cap = match cap {
            Some(cap) => cap,
            None => *cap.insert(daily_cap(tx).await?),
        };
        let profile_ids: Vec<Uuid> = profile_ids.into_iter().collect();
        for chunk in profile_ids.chunks(CHUNK) {
            let ids = stored::queue(
                tx,
                backend,
                campaign,
                Audience::Profiles(chunk),
                cap,
                now,
                0,
            )
            .await?;
            out.extend(
                ids.into_iter()
                    .map(|(delivery_id, status)| Notice::EmailDelivery {
                        tenant_id,
                        delivery_id,
                        campaign_id: Some(campaign.id),
                        status,
                    }),
            );
        }
    }
    Ok(out)
}

// ---------------- settings ----------------

/// The tenant's campaign settings, stored under `campaigns` in its settings document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct CampaignSettings {
    /// Campaign emails one profile may be sent in any 24 hours; 0 for no limit.
    pub daily_cap_per_profile: u32,
}

impl Default for CampaignSettings {
    fn default() -> Self {
        CampaignSettings {
            daily_cap_per_profile: DEFAULT_DAILY_CAP,
        }
    }
}

async fn load_settings(tx: &TenantTx) -> StoreResult<CampaignSettings> {
    store::tenants::settings_section(tx, "campaigns").await
}

async fn daily_cap(tx: &TenantTx) -> StoreResult<i64> {
    Ok(match load_settings(tx).await?.daily_cap_per_profile {
        0 => i64::MAX,
        cap => i64::from(cap),
    })
}

pub async fn settings(
    state: &AppState,
    principal: Option<&Principal>,
) -> ServiceResult<CampaignSettings> {
    let principal = require_permission(principal, Permission::ProfilesRead)?;
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(load_settings(&tx).await?)
}

pub async fn update_settings(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    settings: CampaignSettings,
) -> ServiceResult<CampaignSettings> {
    let principal = require_permission(principal, Permission::CampaignsManage)?;
    if settings.daily_cap_per_profile > 1000 {
        return Err(ServiceError::bad_input(
            "input.dailyCapPerProfile",
            "dailyCapPerProfile must be between 0 (no limit) and 1000",
        ));
    }
    let tx = state.store.begin(principal.tenant_id).await?;
    let value =
        serde_json::to_value(&settings).map_err(|error| ServiceError::Unexpected(error.into()))?;
    store::tenants::set_settings_section(&tx, "campaigns", value.clone()).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "settings.campaigns.update",
        Some("tenant"),
        Some(value),
    )
    .await?;
    tx.commit().await?;
    Ok(settings)
}

// ---------------- unsubscribe ----------------

const TOKEN_VERSION: u8 = 1;
const MAC_LEN: usize = 32;

/// The key of a tenant's unsubscribe links: a secret of the tenant key, which survives
/// master-key rotation (links in old emails must keep working).
fn unsubscribe_secret(keys: &TenantKeys) -> crate::crypto::Key {
    keys.secret("unsubscribe-link-v1")
}

fn unsubscribe_mac(secret: &crate::crypto::Key) -> Hmac<Sha256> {
    <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"))
}

/// A signed token naming the tenant, the profile and the consent purpose: version byte, tenant,
/// profile, purpose, HMAC-SHA256 of all that, in URL-safe base64. It does not expire: RFC 8058
/// links must keep working for as long as the email may be read.
pub fn unsubscribe_token(
    keys: &TenantKeys,
    tenant_id: TenantId,
    profile_id: Uuid,
    purpose: &str,
) -> String {
    let mut payload = Vec::with_capacity(33 + purpose.len() + MAC_LEN);
    payload.push(TOKEN_VERSION);
    payload.extend_from_slice(tenant_id.as_uuid().as_bytes());
    payload.extend_from_slice(profile_id.as_bytes());
    payload.extend_from_slice(purpose.as_bytes());
    let mut mac = unsubscribe_mac(&unsubscribe_secret(keys));
    mac.update(&payload);
    payload.extend_from_slice(&mac.finalize().into_bytes());
    URL_SAFE_NO_PAD.encode(payload)
}

/// The link of an unsubscribe token.
pub fn unsubscribe_url(config: &Config, token: &str) -> String {
    format!("{}/unsubscribe?token={token}", config.public_url)
}

/// What a valid unsubscribe token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub tenant_id: TenantId,
    pub profile_id: Uuid,
    pub purpose: String,
}

/// Checks a token's signature (in constant time) and reads it.
pub async fn parse_unsubscribe_token(state: &AppState, token: &str) -> ServiceResult<Unsubscribe> {
    let invalid = || ServiceError::bad_input("token", "this unsubscribe link is not valid");
    let bytes = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| invalid())?;
    if bytes.len() < 33 + MAC_LEN || bytes[0] != TOKEN_VERSION {
        return Err(invalid());
    }
    let (payload, signature) = bytes.split_at(bytes.len() - MAC_LEN);
    let tenant = Uuid::from_slice(&payload[1..17]).map_err(|_| invalid())?;
    let Some(keys) = state
        .vault
        .tenant_of(&state.store, TenantId(tenant))
        .await?
    else {
        return Err(invalid());
    };
    let mut mac = unsubscribe_mac(&unsubscribe_secret(&keys));
    mac.update(payload);
    mac.verify_slice(signature).map_err(|_| invalid())?;
    let profile = Uuid::from_slice(&payload[17..33]).map_err(|_| invalid())?;
    let purpose = String::from_utf8(payload[33..].to_vec()).map_err(|_| invalid())?;
    Ok(Unsubscribe {
        tenant_id: TenantId(tenant),
        profile_id: profile,
        purpose,
    })
}

/// Withdraws the consent a token names, as `setConsent(granted: false)` would (segments and
/// stages on that consent follow in the same transaction). Idempotent: a consent already
/// withdrawn, or a profile that no longer exists, changes nothing.
pub async fn unsubscribe(state: &AppState, meta: &RequestMeta, token: &str) -> ServiceResult<()> {
    let link = parse_unsubscribe_token(state, token).await?;
    let now = state.now();
    let backend = state.store.backend();
    let tx = state.store.begin(link.tenant_id).await?;
    let Some(profile) = store::profiles::get_resolved(&tx, link.profile_id).await? else {
        return Ok(());
    };
    let withdrawn = store::profiles::consents_of(&tx, &[profile.id])
        .await?
        .iter()
        .any(|consent| consent.purpose == link.purpose && !consent.granted);
    if withdrawn {
        return Ok(());
    }
    let actor = "unsubscribe link";
    let notices = profiles::record_consent(
        &tx,
        backend,
        profile.id,
        &link.purpose,
        false,
        profiles::ConsentSource {
            source: actor,
            actor: None,
        },
        now,
    )
    .await?;
    audit::record(
        state,
        &tx,
        meta,
        actor,
        "consent.set",
        Some(&format!("profile:{}", profile.id)),
        Some(json!({"purpose": link.purpose, "granted": false, "via": "List-Unsubscribe"})),
    )
    .await?;
    let reactions = super::reactions::react(&tx, backend, None, &notices, now).await?;
    tx.commit().await?;
    state.bus.publish(notices);
    state.bus.publish(reactions);
    Ok(())
}

// ---------------- sending ----------------

/// What the outbox worker does with a claimed campaign email.
#[derive(Debug)]
pub enum Prepared {
    Send(Box<OutgoingEmail>),
    /// Not to be sent, for this reason (consent withdrawn since it was queued, profile gone).
    Suppress(&'static str),
    /// The campaign is paused: give the email back for later.
    Hold,
    /// It can never be sent (its campaign is gone, a template fails).
    Fail(String),
}

/// The subject (on one line), text body and HTML body of a campaign for one context.
fn render_all(
    campaign: &CampaignRow,
    context: &minijinja::Value,
) -> Result<(String, String, Option<String>), String> {
    let subject = one_line(&render(&campaign.subject, false, context)?);
    let text_body = render(&campaign.text_body, false, context)?;
    let html_body = campaign
        .html_body
        .as_deref()
        .map(|html| render(html, true, context))
        .transpose()?;
    Ok((subject, text_body, html_body))
}

/// Renders a claimed campaign email for its profile as it is now, with its unsubscribe link.
pub async fn prepare(state: &AppState, row: &OutboxRow) -> ServiceResult<Prepared> {
    let (Some(campaign_id), Some(profile_id)) = (row.campaign_id, row.profile_id) else {
        return Ok(Prepared::Fail("not a campaign email".to_owned()));
    };
    let tenant_id = TenantId(row.tenant_id);
    let tx = state.store.read(tenant_id).await?;
    let Some(campaign) = stored::get(&tx, campaign_id).await? else {
        return Ok(Prepared::Fail("the campaign no longer exists".to_owned()));
    };
    if campaign.status != stored::ACTIVE {
        return Ok(Prepared::Hold);
    }
    let Some(profile) = store::profiles::get_resolved(&tx, profile_id).await? else {
        return Ok(Prepared::Suppress("profile erased"));
    };
    let consented = store::profiles::consents_of(&tx, &[profile.id])
        .await?
        .iter()
        .any(|consent| consent.purpose == campaign.consent_purpose && consent.granted);
    // The address and the traits are sealed under the profile's data key: opened here, for
    // this one email, and never stored opened.
    let reveal = profiles::Reveal::load(
        state,
        &tx,
        false,
        [&profile.traits],
        [row.to_address.as_str()],
    )
    .await?;
    let tenant_keys = state.vault.tenant(&tx).await?;
    drop(tx);
    let Some(to) = reveal.text(&row.to_address).filter(|to| !to.is_empty()) else {
        return Ok(Prepared::Suppress(stored::NO_EMAIL));
    };
    let traits = reveal.object(&profile.traits);
    if !consented {
        return Ok(Prepared::Suppress(stored::NO_CONSENT));
    }
    let token = unsubscribe_token(
        &tenant_keys,
        tenant_id,
        profile.id,
        &campaign.consent_purpose,
    );
    let url = unsubscribe_url(&state.config, &token);
    let context = template_context(profile.id, &traits, &url);
    let rendered = render_all(&campaign, &context);
    let (subject, text_body, html_body) = match rendered {
        Ok(rendered) => rendered,
        Err(error) => return Ok(Prepared::Fail(format!("template: {error}"))),
    };
    Ok(Prepared::Send(Box::new(OutgoingEmail {
        message_id: row.message_id.clone(),
        to,
        subject,
        text_body,
        html_body,
        headers: vec![
            ("List-Unsubscribe".to_owned(), format!("<{url}>")),
            (
                "List-Unsubscribe-Post".to_owned(),
                "List-Unsubscribe=One-Click".to_owned(),
            ),
        ],
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_traits_render_empty_and_html_is_escaped() {
        let context = template_context(
            Uuid::nil(),
            &json!({"name": "<b>Ann</b>"}),
            "https://x.example/unsubscribe?token=t",
        );
        assert_eq!(
            render(
                "Hi {{ profile.traits.name }}{{ profile.traits.missing.deeper }}!",
                false,
                &context
            )
            .unwrap(),
            "Hi <b>Ann</b>!"
        );
        assert_eq!(
            render("<p>{{ profile.traits.name }}</p>", true, &context).unwrap(),
            "<p>&lt;b&gt;Ann&lt;&#x2f;b&gt;</p>"
        );
        assert!(check_template("input.subject", "{{ broken", false).is_err());
        assert!(check_template("input.subject", "{{ x | nosuchfilter }}", false).is_err());
    }

    #[test]
    fn a_subject_is_one_line() {
        assert_eq!(
            one_line("Hello\r\nBcc: x@example.com"),
            "Hello Bcc: x@example.com"
        );
    }
}
