//! The durable email outbox. Emails are written in the same transaction as the change that causes
//! them, and sent later by the outbox worker, which claims due rows through a system transaction
//! (on PostgreSQL with `FOR UPDATE SKIP LOCKED`, so several workers never claim the same row).

use chrono::{DateTime, Duration, Utc};
use sea_orm::sea_query::{Expr, LockBehavior, LockType};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    Set,
};
use uuid::Uuid;

use super::entity::email_outbox;
use super::{Backend, StoreResult, SystemTx, TenantTx};

pub use email_outbox::Model as OutboxRow;

pub const QUEUED: &str = "QUEUED";
pub const SENDING: &str = "SENDING";
pub const SENT: &str = "SENT";
pub const FAILED: &str = "FAILED";
/// A campaign email decided not to be sent (see `suppression_reason`); never claimed.
pub const SUPPRESSED: &str = "SUPPRESSED";

pub struct NewEmail<'a> {
    pub id: Uuid,
    pub message_id: &'a str,
    pub kind: &'a str,
    pub to_address: &'a str,
    pub subject: &'a str,
    pub text_body: &'a str,
    pub html_body: Option<&'a str>,
    pub headers: serde_json::Value,
    pub max_attempts: i32,
}

pub async fn enqueue(
    tx: &TenantTx,
    email: NewEmail<'_>,
    now: DateTime<Utc>,
) -> StoreResult<OutboxRow> {
    Ok(email_outbox::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        id: Set(email.id),
        message_id: Set(email.message_id.to_owned()),
        kind: Set(email.kind.to_owned()),
        to_address: Set(email.to_address.to_owned()),
        subject: Set(email.subject.to_owned()),
        text_body: Set(email.text_body.to_owned()),
        html_body: Set(email.html_body.map(str::to_owned)),
        headers: Set(email.headers),
        status: Set(QUEUED.to_owned()),
        attempts: Set(0),
        max_attempts: Set(email.max_attempts),
        next_attempt_at: Set(now),
        claimed_until: Set(None),
        last_error: Set(None),
        sent_at: Set(None),
        campaign_id: Set(None),
        profile_id: Set(None),
        suppression_reason: Set(None),
        created_at: Set(now),
    }
    .insert(tx.conn())
    .await?)
}

/// How many emails of every tenant wait to be sent (QUEUED or SENDING) and when the oldest of
/// them was created.
pub async fn backlog(tx: &SystemTx) -> StoreResult<(i64, Option<DateTime<Utc>>)> {
    Ok(email_outbox::Entity::find()
        .select_only()
        .column_as(email_outbox::Column::Id.count(), "n")
        .column_as(email_outbox::Column::CreatedAt.min(), "oldest")
        .filter(email_outbox::Column::Status.is_in([QUEUED, SENDING]))
        .into_tuple::<(i64, Option<DateTime<Utc>>)>()
        .one(tx.conn())
        .await?
        .unwrap_or((0, None)))
}

/// Claims up to `limit` due emails of any tenant: queued ones whose time has come, and ones whose
/// previous claim expired (the claiming process died). A claim is a lease until `lease_until`.
pub async fn claim_due(
    tx: &SystemTx,
    backend: Backend,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    limit: u64,
) -> StoreResult<Vec<OutboxRow>> {
    let due = Condition::any()
        .add(
            Condition::all()
                .add(email_outbox::Column::Status.eq(QUEUED))
                .add(email_outbox::Column::NextAttemptAt.lte(now)),
        )
        .add(
            Condition::all()
                .add(email_outbox::Column::Status.eq(SENDING))
                .add(email_outbox::Column::ClaimedUntil.lt(now)),
        );
    let mut query = email_outbox::Entity::find()
        .filter(due)
        .order_by_asc(email_outbox::Column::NextAttemptAt)
        .limit(limit);
    if backend == Backend::Postgres {
        query = query.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    }
    let rows = query.all(tx.conn()).await?;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        email_outbox::Entity::update_many()
            .col_expr(email_outbox::Column::Status, Expr::value(SENDING))
            .col_expr(email_outbox::Column::ClaimedUntil, Expr::value(lease_until))
            .col_expr(
                email_outbox::Column::Attempts,
                Expr::value(row.attempts + 1),
            )
            .filter(email_outbox::Column::TenantId.eq(row.tenant_id))
            .filter(email_outbox::Column::Id.eq(row.id))
            .exec(tx.conn())
            .await?;
        claimed.push(OutboxRow {
            status: SENDING.to_owned(),
            claimed_until: Some(lease_until),
            attempts: row.attempts + 1,
            ..row
        });
    }
    Ok(claimed)
}

pub async fn mark_sent(tx: &SystemTx, row: &OutboxRow, now: DateTime<Utc>) -> StoreResult<()> {
    email_outbox::Entity::update_many()
        .col_expr(email_outbox::Column::Status, Expr::value(SENT))
        .col_expr(email_outbox::Column::SentAt, Expr::value(now))
        .col_expr(
            email_outbox::Column::ClaimedUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(
            email_outbox::Column::LastError,
            Expr::value(Option::<String>::None),
        )
        .filter(email_outbox::Column::TenantId.eq(row.tenant_id))
        .filter(email_outbox::Column::Id.eq(row.id))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// Records a failed attempt: back to QUEUED with a later `next_attempt_at`, or FAILED for good.
pub async fn mark_attempt_failed(
    tx: &SystemTx,
    row: &OutboxRow,
    error: &str,
    permanent: bool,
    retry_after: Duration,
    now: DateTime<Utc>,
) -> StoreResult<&'static str> {
    let status = if permanent || row.attempts >= row.max_attempts {
        FAILED
    } else {
        QUEUED
    };
    email_outbox::Entity::update_many()
        .col_expr(email_outbox::Column::Status, Expr::value(status))
        .col_expr(
            email_outbox::Column::NextAttemptAt,
            Expr::value(now + retry_after),
        )
        .col_expr(
            email_outbox::Column::ClaimedUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(email_outbox::Column::LastError, Expr::value(error))
        .filter(email_outbox::Column::TenantId.eq(row.tenant_id))
        .filter(email_outbox::Column::Id.eq(row.id))
        .exec(tx.conn())
        .await?;
    Ok(status)
}

/// Records that a claimed email will not be sent, and why (consent withdrawn since it was queued).
pub async fn mark_suppressed(
    tx: &SystemTx,
    row: &OutboxRow,
    reason: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    email_outbox::Entity::update_many()
        .col_expr(email_outbox::Column::Status, Expr::value(SUPPRESSED))
        .col_expr(email_outbox::Column::SuppressionReason, Expr::value(reason))
        .col_expr(email_outbox::Column::NextAttemptAt, Expr::value(now))
        .col_expr(
            email_outbox::Column::ClaimedUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .filter(email_outbox::Column::TenantId.eq(row.tenant_id))
        .filter(email_outbox::Column::Id.eq(row.id))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// Gives a claimed email back unsent, without counting the attempt, to be claimed again at
/// `retry_at` (its campaign is paused).
pub async fn release(tx: &SystemTx, row: &OutboxRow, retry_at: DateTime<Utc>) -> StoreResult<()> {
    email_outbox::Entity::update_many()
        .col_expr(email_outbox::Column::Status, Expr::value(QUEUED))
        .col_expr(email_outbox::Column::NextAttemptAt, Expr::value(retry_at))
        .col_expr(
            email_outbox::Column::Attempts,
            Expr::value((row.attempts - 1).max(0)),
        )
        .col_expr(
            email_outbox::Column::ClaimedUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .filter(email_outbox::Column::TenantId.eq(row.tenant_id))
        .filter(email_outbox::Column::Id.eq(row.id))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// Every email of the tenant, oldest first (operator views and tests).
pub async fn list(tx: &TenantTx) -> StoreResult<Vec<OutboxRow>> {
    Ok(email_outbox::Entity::find()
        .filter(email_outbox::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .order_by_asc(email_outbox::Column::CreatedAt)
        .all(tx.conn())
        .await?)
}
