//! The audit log: who changed what, when, from where. Append-only.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};
use uuid::Uuid;

use super::entity::audit_log;
use super::{StoreResult, TenantTx};

pub use audit_log::Model as AuditRow;

pub struct NewAuditEntry<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub detail: Option<serde_json::Value>,
    pub ip: Option<&'a str>,
}

pub async fn append(
    tx: &TenantTx,
    entry: NewAuditEntry<'_>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    audit_log::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        id: Set(Uuid::now_v7()),
        at: Set(now),
        actor: Set(entry.actor.to_owned()),
        action: Set(entry.action.to_owned()),
        target: Set(entry.target.map(str::to_owned)),
        detail: Set(entry.detail),
        ip: Set(entry.ip.map(str::to_owned)),
    }
    .insert(tx.conn())
    .await?;
    Ok(())
}

/// One page of the log, newest first, before the cursor id.
pub async fn page(
    tx: &TenantTx,
    before: Option<Uuid>,
    limit: u64,
) -> StoreResult<(Vec<AuditRow>, u64)> {
    let base =
        audit_log::Entity::find().filter(audit_log::Column::TenantId.eq(tx.tenant_id().as_uuid()));
    let total = base.clone().count(tx.conn()).await?;
    let mut query = base.order_by_desc(audit_log::Column::Id).limit(limit);
    if let Some(before) = before {
        query = query.filter(audit_log::Column::Id.lt(before));
    }
    Ok((query.all(tx.conn()).await?, total))
}
