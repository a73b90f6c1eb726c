//! Campaigns and the queuing of their emails.
//!
//! Guarantees: a campaign email is queued by one `INSERT … SELECT` over the profiles it is for (a
//! handful from a trigger, or every member of a segment for a broadcast), so no profile is loaded
//! into memory; the unique index on `(tenant_id, campaign_id, profile_id)` makes one email per
//! (campaign, profile), and `ON CONFLICT` turns a repeated trigger into nothing, except that a
//! SUPPRESSED email is decided again (consent may have been granted since). Whether an email is
//! QUEUED or SUPPRESSED (and why) is decided by the same statement, from the profile's consent,
//! email identity and the campaign emails it got in the last day.

use chrono::{DateTime, Duration, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, Statement,
};
use uuid::Uuid;

use super::conditions::{db_backend, Sql};
use super::entity::{campaigns, email_outbox};
use super::outbox::{OutboxRow, FAILED, QUEUED, SENDING, SENT, SUPPRESSED};
use super::{Backend, StoreResult, TenantTx};

pub use campaigns::Model as CampaignRow;

pub const DRAFT: &str = "DRAFT";
pub const ACTIVE: &str = "ACTIVE";
pub const PAUSED: &str = "PAUSED";

/// The `kind` of campaign rows in the outbox.
pub const EMAIL_KIND: &str = "campaign";

/// Why an email was suppressed.
pub const NO_CONSENT: &str = "no consent";
pub const NO_EMAIL: &str = "no email";
pub const FREQUENCY_CAP: &str = "frequency cap";

/// Everything of a campaign but its id, status and times.
#[derive(Debug, Clone)]
pub struct CampaignDraft {
    pub name: String,
    pub trigger_kind: String,
    pub segment_id: Option<Uuid>,
    pub stage: Option<String>,
    pub event: Option<String>,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
    pub consent_purpose: String,
}

pub async fn insert(
    tx: &TenantTx,
    id: Uuid,
    draft: CampaignDraft,
    now: DateTime<Utc>,
) -> StoreResult<CampaignRow> {
    Ok(campaigns::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        id: Set(id),
        name: Set(draft.name),
        status: Set(DRAFT.to_owned()),
        trigger_kind: Set(draft.trigger_kind),
        segment_id: Set(draft.segment_id),
        stage: Set(draft.stage),
        event: Set(draft.event),
        subject: Set(draft.subject),
        text_body: Set(draft.text_body),
        html_body: Set(draft.html_body),
        consent_purpose: Set(draft.consent_purpose),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(tx.conn())
    .await?)
}

/// Replaces everything but the status.
pub async fn update(
    tx: &TenantTx,
    id: Uuid,
    draft: CampaignDraft,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    campaigns::Entity::update_many()
        .col_expr(campaigns::Column::Name, Expr::value(draft.name))
        .col_expr(
            campaigns::Column::TriggerKind,
            Expr::value(draft.trigger_kind),
        )
        .col_expr(campaigns::Column::SegmentId, Expr::value(draft.segment_id))
        .col_expr(campaigns::Column::Stage, Expr::value(draft.stage))
        .col_expr(campaigns::Column::Event, Expr::value(draft.event))
        .col_expr(campaigns::Column::Subject, Expr::value(draft.subject))
        .col_expr(campaigns::Column::TextBody, Expr::value(draft.text_body))
        .col_expr(campaigns::Column::HtmlBody, Expr::value(draft.html_body))
        .col_expr(
            campaigns::Column::ConsentPurpose,
            Expr::value(draft.consent_purpose),
        )
        .col_expr(campaigns::Column::UpdatedAt, Expr::value(now))
        .filter(campaigns::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(campaigns::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    Ok(())
}

pub async fn set_status(
    tx: &TenantTx,
    id: Uuid,
    status: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    campaigns::Entity::update_many()
        .col_expr(campaigns::Column::Status, Expr::value(status))
        .col_expr(campaigns::Column::UpdatedAt, Expr::value(now))
        .filter(campaigns::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(campaigns::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    Ok(())
}

pub async fn get(tx: &TenantTx, id: Uuid) -> StoreResult<Option<CampaignRow>> {
    Ok(campaigns::Entity::find()
        .filter(campaigns::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(campaigns::Column::Id.eq(id))
        .one(tx.conn())
        .await?)
}

/// Every campaign of the tenant, oldest first.
pub async fn list(tx: &TenantTx) -> StoreResult<Vec<CampaignRow>> {
    Ok(campaigns::Entity::find()
        .filter(campaigns::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .order_by_asc(campaigns::Column::CreatedAt)
        .order_by_asc(campaigns::Column::Id)
        .all(tx.conn())
        .await?)
}

/// The tenant's active campaigns (the write path asks on every batch that could trigger one).
pub async fn active(tx: &TenantTx) -> StoreResult<Vec<CampaignRow>> {
    Ok(campaigns::Entity::find()
        .filter(campaigns::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(campaigns::Column::Status.eq(ACTIVE))
        .all(tx.conn())
        .await?)
}

/// Whom a queuing statement is for.
#[derive(Debug, Clone, Copy)]
pub enum Audience<'a> {
    /// These profiles (the ones a trigger fired for).
    Profiles(&'a [Uuid]),
    /// Every current member of the segment (a broadcast).
    SegmentMembers(Uuid),
}

/// Queues the campaign's email for every profile of `audience`: QUEUED, or SUPPRESSED with its
/// reason. `daily_cap` is the most campaign emails (queued or sent) a profile may get in any 24
/// hours. Returns the ids of the rows written (for a segment, at most `notice_limit` of them).
pub async fn queue(
    tx: &TenantTx,
    backend: Backend,
    campaign: &CampaignRow,
    audience: Audience<'_>,
    daily_cap: i64,
    now: DateTime<Utc>,
    notice_limit: u64,
) -> StoreResult<Vec<(Uuid, &'static str)>> {
    let tenant = tx.tenant_id().as_uuid();
    if let Audience::Profiles(ids) = audience {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
    }
    let (new_id, hex_id, empty_json) = match backend {
        Backend::Postgres => (
            "gen_random_uuid()",
            "replace(c.id::text, '-', '')",
            "CAST('{}' AS jsonb)",
        ),
        // sqlx stores a UUID as 16 bytes on SQLite.
        Backend::Sqlite => ("randomblob(16)", "lower(hex(c.id))", "'{}'"),
    };
    let mut sql = Sql::default();
    sql.push(
        "INSERT INTO email_outbox (tenant_id, id, message_id, kind, to_address, subject, \
         text_body, html_body, headers, status, attempts, max_attempts, next_attempt_at, \
         claimed_until, last_error, sent_at, campaign_id, profile_id, suppression_reason, \
         created_at) SELECT ",
    )
    .bind(tenant)
    .push(", ")
    .push(new_id)
    .push(", ")
    // A stable Message-ID: one per (campaign, profile), like the row itself.
    .bind(format!("<{}.", campaign.id.simple()))
    .push(" || ")
    .push(hex_id)
    .push(" || ")
    .bind("@campaign.cdp>".to_owned())
    .push(", ")
    .bind(EMAIL_KIND.to_owned())
    .push(", COALESCE(c.address, ''), '', '', NULL, ")
    .push(empty_json)
    .push(", CASE WHEN NOT c.consented THEN ")
    .bind(SUPPRESSED.to_owned())
    .push(" WHEN c.address IS NULL THEN ")
    .bind(SUPPRESSED.to_owned())
    .push(" WHEN c.recent >= ")
    .bind(daily_cap)
    .push(" THEN ")
    .bind(SUPPRESSED.to_owned())
    .push(" ELSE ")
    .bind(QUEUED.to_owned())
    // max_attempts 0: the worker applies its configured CDP_OUTBOX_MAX_ATTEMPTS.
    .push(" END, 0, 0, ")
    .bind(now)
    .push(", NULL, NULL, NULL, ")
    .bind(campaign.id)
    .push(", c.id, CASE WHEN NOT c.consented THEN ")
    .bind(NO_CONSENT.to_owned())
    .push(" WHEN c.address IS NULL THEN ")
    .bind(NO_EMAIL.to_owned())
    .push(" WHEN c.recent >= ")
    .bind(daily_cap)
    .push(" THEN ")
    .bind(FREQUENCY_CAP.to_owned())
    .push(" ELSE NULL END, ")
    .bind(now)
    .push(" FROM (SELECT p.id AS id, (SELECT i.value FROM identities i WHERE i.tenant_id = p.tenant_id AND i.profile_id = p.id AND i.kind = ")
    .bind(domain::identity::EMAIL.to_owned())
    .push(" ORDER BY i.created_at DESC LIMIT 1) AS address, EXISTS (SELECT 1 FROM consents k WHERE k.tenant_id = p.tenant_id AND k.profile_id = p.id AND k.purpose = ")
    .bind(campaign.consent_purpose.clone())
    .push(" AND k.granted = ")
    .bind(true)
    .push(") AS consented, (SELECT COUNT(*) FROM email_outbox o WHERE o.tenant_id = p.tenant_id AND o.profile_id = p.id AND o.campaign_id IS NOT NULL AND o.status IN (")
    .bind(QUEUED.to_owned())
    .push(", ")
    .bind(SENDING.to_owned())
    .push(", ")
    .bind(SENT.to_owned())
    .push(") AND o.created_at > ")
    .bind(now - Duration::hours(24))
    .push(") AS recent FROM ");
    match audience {
        Audience::Profiles(ids) => {
            sql.push("profiles p WHERE p.tenant_id = ")
                .bind(tenant)
                .push(" AND p.id IN (");
            for (index, id) in ids.iter().enumerate() {
                if index > 0 {
                    sql.push(", ");
                }
                sql.bind(*id);
            }
            sql.push(")");
        }
        Audience::SegmentMembers(segment_id) => {
            sql.push(
                "segment_members m JOIN profiles p ON p.tenant_id = m.tenant_id AND p.id = \
                 m.profile_id WHERE m.tenant_id = ",
            )
            .bind(tenant)
            .push(" AND m.segment_id = ")
            .bind(segment_id);
        }
    }
    // Tombstones of merged profiles are never emailed. `WHERE` before `ON CONFLICT` is required
    // by SQLite's parser for an upsert from a SELECT.
    sql.push(" AND p.merged_into IS NULL) c WHERE 1 = 1 ON CONFLICT (tenant_id, campaign_id, profile_id) DO UPDATE SET status = excluded.status, suppression_reason = excluded.suppression_reason, to_address = excluded.to_address, next_attempt_at = excluded.next_attempt_at, created_at = excluded.created_at WHERE email_outbox.status = ")
        .bind(SUPPRESSED.to_owned())
        .push(" AND excluded.status = ")
        .bind(QUEUED.to_owned());
    match audience {
        Audience::Profiles(_) => {
            sql.push(" RETURNING id, status");
            let (text, values) = sql.render(backend);
            let rows = tx
                .conn()
                .query_all_raw(Statement::from_sql_and_values(
                    db_backend(backend),
                    text,
                    values,
                ))
                .await?;
            rows.into_iter()
                .map(|row| {
                    let id = row.try_get_by_index::<Uuid>(0)?;
                    let status = row.try_get_by_index::<String>(1)?;
                    Ok((id, delivery_status(&status)))
                })
                .collect()
        }
        Audience::SegmentMembers(_) => {
            let (text, values) = sql.render(backend);
            tx.conn()
                .execute_raw(Statement::from_sql_and_values(
                    db_backend(backend),
                    text,
                    values,
                ))
                .await?;
            // A broadcast may queue millions: only the first rows get a notice each.
            Ok(email_outbox::Entity::find()
                .select_only()
                .column(email_outbox::Column::Id)
                .column(email_outbox::Column::Status)
                .filter(email_outbox::Column::TenantId.eq(tenant))
                .filter(email_outbox::Column::CampaignId.eq(campaign.id))
                .filter(email_outbox::Column::CreatedAt.eq(now))
                .limit(notice_limit)
                .into_tuple::<(Uuid, String)>()
                .all(tx.conn())
                .await?
                .into_iter()
                .map(|(id, status)| (id, delivery_status(&status)))
                .collect())
        }
    }
}

/// Per status, how many emails the campaign has.
pub async fn stats(tx: &TenantTx, campaign_id: Uuid) -> StoreResult<Vec<(String, i64)>> {
    Ok(email_outbox::Entity::find()
        .select_only()
        .column(email_outbox::Column::Status)
        .column_as(email_outbox::Column::Id.count(), "n")
        .filter(email_outbox::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(email_outbox::Column::CampaignId.eq(campaign_id))
        .group_by(email_outbox::Column::Status)
        .into_tuple::<(String, i64)>()
        .all(tx.conn())
        .await?)
}

/// Which campaign emails a listing shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliveryFilter {
    pub campaign_id: Option<Uuid>,
    pub profile_id: Option<Uuid>,
}

fn deliveries(tx: &TenantTx, filter: DeliveryFilter) -> sea_orm::Select<email_outbox::Entity> {
    let mut query = email_outbox::Entity::find()
        .filter(email_outbox::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(email_outbox::Column::CampaignId.is_not_null());
    if let Some(campaign_id) = filter.campaign_id {
        query = query.filter(email_outbox::Column::CampaignId.eq(campaign_id));
    }
    if let Some(profile_id) = filter.profile_id {
        query = query.filter(email_outbox::Column::ProfileId.eq(profile_id));
    }
    query
}

/// Campaign emails in id order after `after`, `limit` of them at most.
pub async fn delivery_page(
    tx: &TenantTx,
    filter: DeliveryFilter,
    after: Option<Uuid>,
    limit: u64,
) -> StoreResult<Vec<OutboxRow>> {
    let mut query = deliveries(tx, filter);
    if let Some(after) = after {
        query = query.filter(email_outbox::Column::Id.gt(after));
    }
    Ok(query
        .order_by_asc(email_outbox::Column::Id)
        .limit(limit)
        .all(tx.conn())
        .await?)
}

pub async fn delivery_count(tx: &TenantTx, filter: DeliveryFilter) -> StoreResult<u64> {
    Ok(deliveries(tx, filter).count(tx.conn()).await?)
}

/// One email of the tenant by id.
pub async fn delivery(tx: &TenantTx, id: Uuid) -> StoreResult<Option<OutboxRow>> {
    Ok(email_outbox::Entity::find()
        .filter(email_outbox::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(email_outbox::Column::Id.eq(id))
        .one(tx.conn())
        .await?)
}

/// The contract's status of an outbox status: a claimed email is still QUEUED to callers.
pub fn delivery_status(status: &str) -> &'static str {
    match status {
        SENT => SENT,
        FAILED => FAILED,
        SUPPRESSED => SUPPRESSED,
        _ => QUEUED,
    }
}
