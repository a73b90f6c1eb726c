//! Webhooks and their durable delivery queue. Deliveries are written in the same transaction as
//! the change that causes them and sent later by the webhook worker, which claims due rows through
//! a system transaction (on PostgreSQL with `FOR UPDATE SKIP LOCKED`, so several workers never
//! claim the same row) and holds each claim as a lease.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, LockBehavior, LockType};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};
use uuid::Uuid;

use super::entity::{webhook_deliveries, webhooks};
use super::{Backend, StoreError, StoreResult, SystemTx, TenantTx};

pub use webhook_deliveries::Model as DeliveryRow;
pub use webhooks::Model as WebhookRow;

pub const QUEUED: &str = "QUEUED";
pub const SENT: &str = "SENT";
pub const FAILED: &str = "FAILED";

/// Rows per multi-row insert, well below the bound-parameter limits of both databases.
const CHUNK: usize = 500;

pub struct NewWebhook<'a> {
    pub id: Uuid,
    pub url: &'a str,
    pub topics: serde_json::Value,
    pub segment_id: Option<Uuid>,
    pub event_name: Option<&'a str>,
    pub secret_salt: &'a str,
}

pub async fn insert(
    tx: &TenantTx,
    webhook: NewWebhook<'_>,
    now: DateTime<Utc>,
) -> StoreResult<WebhookRow> {
    Ok(webhooks::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        id: Set(webhook.id),
        url: Set(webhook.url.to_owned()),
        topics: Set(webhook.topics),
        segment_id: Set(webhook.segment_id),
        event_name: Set(webhook.event_name.map(str::to_owned)),
        secret_salt: Set(webhook.secret_salt.to_owned()),
        active: Set(true),
        created_at: Set(now),
    }
    .insert(tx.conn())
    .await?)
}

pub async fn get(tx: &TenantTx, id: Uuid) -> StoreResult<Option<WebhookRow>> {
    Ok(webhooks::Entity::find()
        .filter(webhooks::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(webhooks::Column::Id.eq(id))
        .one(tx.conn())
        .await?)
}

/// Every webhook of the tenant, oldest first.
pub async fn list(tx: &TenantTx) -> StoreResult<Vec<WebhookRow>> {
    Ok(webhooks::Entity::find()
        .filter(webhooks::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .order_by_asc(webhooks::Column::Id)
        .all(tx.conn())
        .await?)
}

/// The tenant's active webhooks: the one query the write path pays per transaction (the primary
/// key starts with `tenant_id`).
pub async fn active(tx: &TenantTx) -> StoreResult<Vec<WebhookRow>> {
    Ok(webhooks::Entity::find()
        .filter(webhooks::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(webhooks::Column::Active.eq(true))
        .all(tx.conn())
        .await?)
}

pub async fn set_active(tx: &TenantTx, id: Uuid, active: bool) -> StoreResult<WebhookRow> {
    webhooks::Entity::update_many()
        .col_expr(webhooks::Column::Active, Expr::value(active))
        .filter(webhooks::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(webhooks::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    get(tx, id).await?.ok_or(StoreError::NotFound)
}

/// Deletes a webhook and its delivery log. Returns false when there was no such webhook.
pub async fn delete(tx: &TenantTx, id: Uuid) -> StoreResult<bool> {
    let tenant = tx.tenant_id().as_uuid();
    // The foreign key cascades too; deleting explicitly does not depend on SQLite's setting.
    webhook_deliveries::Entity::delete_many()
        .filter(webhook_deliveries::Column::TenantId.eq(tenant))
        .filter(webhook_deliveries::Column::WebhookId.eq(id))
        .exec(tx.conn())
        .await?;
    let result = webhooks::Entity::delete_many()
        .filter(webhooks::Column::TenantId.eq(tenant))
        .filter(webhooks::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    Ok(result.rows_affected > 0)
}

pub struct NewDelivery {
    pub id: Uuid,
    pub webhook_id: Uuid,
    pub topic: &'static str,
    pub payload: serde_json::Value,
    /// The profile the delivery is about, if any: erasure deletes its queued deliveries.
    pub profile_id: Option<Uuid>,
}

/// Queues deliveries, due at once, with multi-row inserts.
pub async fn enqueue(
    tx: &TenantTx,
    deliveries: Vec<NewDelivery>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    let delivery_bytes = |delivery: &NewDelivery| {
        delivery.topic.len() + domain::json::text_len(&delivery.payload) + 12 * super::wire::FIXED
    };
    for chunk in super::wire::chunks(tx, &deliveries, CHUNK, delivery_bytes) {
        let rows = chunk
            .iter()
            .map(|delivery| webhook_deliveries::ActiveModel {
                tenant_id: Set(tenant),
                id: Set(delivery.id),
                webhook_id: Set(delivery.webhook_id),
                topic: Set(delivery.topic.to_owned()),
                payload: Set(delivery.payload.clone()),
                status: Set(QUEUED.to_owned()),
                attempts: Set(0),
                next_attempt_at: Set(now),
                lease_until: Set(None),
                last_status_code: Set(None),
                last_error: Set(None),
                attempt_log: Set(serde_json::Value::Array(Vec::new())),
                created_at: Set(now),
                sent_at: Set(None),
                profile_id: Set(delivery.profile_id),
            });
        webhook_deliveries::Entity::insert_many(rows)
            .exec(tx.conn())
            .await?;
    }
    Ok(())
}

/// Claims up to `limit` due deliveries of any tenant: queued ones whose time has come and whose
/// previous lease, if any, expired (the claiming process died). Each claim counts as an attempt
/// and holds until `lease_until`.
pub async fn claim_due(
    tx: &SystemTx,
    backend: Backend,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    limit: u64,
) -> StoreResult<Vec<DeliveryRow>> {
    let due = Condition::all()
        .add(webhook_deliveries::Column::Status.eq(QUEUED))
        .add(webhook_deliveries::Column::NextAttemptAt.lte(now))
        .add(
            Condition::any()
                .add(webhook_deliveries::Column::LeaseUntil.is_null())
                .add(webhook_deliveries::Column::LeaseUntil.lt(now)),
        );
    let mut query = webhook_deliveries::Entity::find()
        .filter(due)
        .order_by_asc(webhook_deliveries::Column::NextAttemptAt)
        .limit(limit);
    if backend == Backend::Postgres {
        query = query.lock_with_behavior(LockType::Update, LockBehavior::SkipLocked);
    }
    let rows = query.all(tx.conn()).await?;
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        webhook_deliveries::Entity::update_many()
            .col_expr(
                webhook_deliveries::Column::LeaseUntil,
                Expr::value(lease_until),
            )
            .col_expr(
                webhook_deliveries::Column::Attempts,
                Expr::value(row.attempts + 1),
            )
            .filter(webhook_deliveries::Column::TenantId.eq(row.tenant_id))
            .filter(webhook_deliveries::Column::Id.eq(row.id))
            .exec(tx.conn())
            .await?;
        claimed.push(DeliveryRow {
            lease_until: Some(lease_until),
            attempts: row.attempts + 1,
            ..row
        });
    }
    Ok(claimed)
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: DateTime<Utc>,
    /// The HTTP status of the answer, when there was one.
    pub status_code: Option<i32>,
    /// Why the attempt failed (a non-2xx status, a timeout, a refused connection).
    pub error: Option<String>,
}

/// Records an attempt of a claimed delivery: its new status (SENT, QUEUED again or FAILED), when
/// to try next, and the attempt appended to its log. Releases the lease.
pub async fn record_attempt(
    tx: &SystemTx,
    row: &DeliveryRow,
    attempt: &Attempt,
    status: &'static str,
    next_attempt_at: DateTime<Utc>,
) -> StoreResult<()> {
    let mut log = match &row.attempt_log {
        serde_json::Value::Array(entries) => entries.clone(),
        _ => Vec::new(),
    };
    log.push(serde_json::json!({
        "at": attempt.at,
        "statusCode": attempt.status_code,
        "error": attempt.error,
    }));
    let sent_at = (status == SENT).then_some(attempt.at);
    webhook_deliveries::Entity::update_many()
        .col_expr(webhook_deliveries::Column::Status, Expr::value(status))
        .col_expr(
            webhook_deliveries::Column::NextAttemptAt,
            Expr::value(next_attempt_at),
        )
        .col_expr(
            webhook_deliveries::Column::LeaseUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(
            webhook_deliveries::Column::LastStatusCode,
            Expr::value(attempt.status_code),
        )
        .col_expr(
            webhook_deliveries::Column::LastError,
            Expr::value(attempt.error.clone()),
        )
        .col_expr(
            webhook_deliveries::Column::AttemptLog,
            Expr::value(serde_json::Value::Array(log)),
        )
        .col_expr(webhook_deliveries::Column::SentAt, Expr::value(sent_at))
        .filter(webhook_deliveries::Column::TenantId.eq(row.tenant_id))
        .filter(webhook_deliveries::Column::Id.eq(row.id))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// One page of a webhook's delivery log, newest first, before the cursor id.
pub async fn deliveries_page(
    tx: &TenantTx,
    webhook_id: Uuid,
    before: Option<Uuid>,
    limit: u64,
) -> StoreResult<(Vec<DeliveryRow>, u64)> {
    let base = webhook_deliveries::Entity::find()
        .filter(webhook_deliveries::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(webhook_deliveries::Column::WebhookId.eq(webhook_id));
    let total = base.clone().count(tx.conn()).await?;
    let mut query = base
        .order_by_desc(webhook_deliveries::Column::Id)
        .limit(limit);
    if let Some(before) = before {
        query = query.filter(webhook_deliveries::Column::Id.lt(before));
    }
    Ok((query.all(tx.conn()).await?, total))
}
