//! Reading everything stored about a set of profiles (export) and deleting it (erasure).
//!
//! Guarantees: [`PERSON_TABLES`] names every table with a `profile_id` column; a test in `tests/`
//! checks the list against the schema, so a new table cannot be forgotten by erasure.

use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder};
use uuid::Uuid;

use super::entity::{
    email_outbox, events, lifecycle_transitions, profiles, segment_history, segment_members,
    segments, webhook_deliveries,
};
use super::{StoreResult, TenantTx};

pub use email_outbox::Model as OutboxRow;
pub use lifecycle_transitions::Model as TransitionRow;
pub use segment_history::Model as HistoryRow;

/// Every table whose rows belong to one person through a `profile_id` column, deleted by
/// erasure in this order (children first). `merge_ledger` also names people in
/// `other_profile_id`; `profiles` itself is deleted last, by `id`; `profile_keys` is the key
/// store, deleted by the caller to crypto-shred; `erasures` is the register of erasures itself.
pub const PERSON_TABLES: [&str; 11] = [
    "segment_members",
    "segment_history",
    "lifecycle_transitions",
    "consent_history",
    "consents",
    "profile_groups",
    "email_outbox",
    "webhook_deliveries",
    "merge_ledger",
    "identities",
    "events",
];

/// Tables with a `profile_id` column that erasure deliberately does not empty, and why.
pub const PERSON_TABLES_KEPT: [(&str, &str); 2] = [
    (
        "profile_keys",
        "the key store: the caller destroys the keys, which crypto-shreds every copy",
    ),
    (
        "erasures",
        "the register of erasures: ids and counts only, so that a restore skips the person",
    ),
];

/// What an erasure deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub events: u64,
    pub identities: u64,
    pub rows: u64,
}

/// Deletes every row of these profiles (live ones and their merged tombstones) from every table
/// of [`PERSON_TABLES`], then the profiles. Returns the counts.
pub async fn erase(tx: &TenantTx, ids: &[Uuid]) -> StoreResult<Deleted> {
    let tenant = tx.tenant_id().as_uuid();
    let mut deleted = Deleted::default();
    if ids.is_empty() {
        return Ok(deleted);
    }
    for table in PERSON_TABLES {
        let mut delete = Query::delete();
        delete
            .from_table(Alias::new(table))
            .and_where(Expr::col(Alias::new("tenant_id")).eq(tenant));
        if table == "merge_ledger" {
            delete.and_where(
                Expr::col(Alias::new("profile_id"))
                    .is_in(ids.iter().copied())
                    .or(Expr::col(Alias::new("other_profile_id")).is_in(ids.iter().copied())),
            );
        } else {
            delete.and_where(Expr::col(Alias::new("profile_id")).is_in(ids.iter().copied()));
        }
        let affected = tx.conn().execute(&delete).await?.rows_affected();
        match table {
            "events" => deleted.events = affected,
            "identities" => deleted.identities = affected,
            _ => {}
        }
        deleted.rows += affected;
    }
    // Tombstones first would break nothing (no foreign key points at them any more), but the
    // survivor's tombstones point at it: clear the pointers, then delete all at once.
    let result = profiles::Entity::delete_many()
        .filter(profiles::Column::TenantId.eq(tenant))
        .filter(profiles::Column::Id.is_in(ids.iter().copied()))
        .exec(tx.conn())
        .await?;
    deleted.rows += result.rows_affected;
    Ok(deleted)
}

/// The segments these profiles are members of: (segment id, segment name, since).
pub async fn memberships_of(
    tx: &TenantTx,
    ids: &[Uuid],
) -> StoreResult<Vec<(Uuid, String, chrono::DateTime<chrono::Utc>)>> {
    let tenant = tx.tenant_id().as_uuid();
    let members = segment_members::Entity::find()
        .filter(segment_members::Column::TenantId.eq(tenant))
        .filter(segment_members::Column::ProfileId.is_in(ids.iter().copied()))
        .all(tx.conn())
        .await?;
    let names: std::collections::HashMap<Uuid, String> = segments::Entity::find()
        .filter(segments::Column::TenantId.eq(tenant))
        .all(tx.conn())
        .await?
        .into_iter()
        .map(|row| (row.id, row.name))
        .collect();
    Ok(members
        .into_iter()
        .map(|row| {
            let name = names.get(&row.segment_id).cloned().unwrap_or_default();
            (row.segment_id, name, row.since)
        })
        .collect())
}

/// The segment membership history of these profiles, oldest first.
pub async fn segment_history_of(tx: &TenantTx, ids: &[Uuid]) -> StoreResult<Vec<HistoryRow>> {
    Ok(segment_history::Entity::find()
        .filter(segment_history::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(segment_history::Column::ProfileId.is_in(ids.iter().copied()))
        .order_by_asc(segment_history::Column::At)
        .order_by_asc(segment_history::Column::Id)
        .all(tx.conn())
        .await?)
}

/// The lifecycle transitions of these profiles, oldest first.
pub async fn transitions_of(tx: &TenantTx, ids: &[Uuid]) -> StoreResult<Vec<TransitionRow>> {
    Ok(lifecycle_transitions::Entity::find()
        .filter(lifecycle_transitions::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(lifecycle_transitions::Column::ProfileId.is_in(ids.iter().copied()))
        .order_by_asc(lifecycle_transitions::Column::At)
        .order_by_asc(lifecycle_transitions::Column::Id)
        .all(tx.conn())
        .await?)
}

/// The emails queued or sent to these profiles, oldest first.
pub async fn emails_of(tx: &TenantTx, ids: &[Uuid]) -> StoreResult<Vec<OutboxRow>> {
    Ok(email_outbox::Entity::find()
        .filter(email_outbox::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(email_outbox::Column::ProfileId.is_in(ids.iter().copied()))
        .order_by_asc(email_outbox::Column::CreatedAt)
        .order_by_asc(email_outbox::Column::Id)
        .all(tx.conn())
        .await?)
}

/// The webhook deliveries about these profiles: (id, topic, status, created at).
pub async fn webhook_deliveries_of(
    tx: &TenantTx,
    ids: &[Uuid],
) -> StoreResult<Vec<webhook_deliveries::Model>> {
    Ok(webhook_deliveries::Entity::find()
        .filter(webhook_deliveries::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(webhook_deliveries::Column::ProfileId.is_in(ids.iter().copied()))
        .order_by_asc(webhook_deliveries::Column::CreatedAt)
        .all(tx.conn())
        .await?)
}

/// Up to `limit` profiles (tombstones included) after `after`, in id order: (id, traits).
pub async fn traits_page(
    tx: &TenantTx,
    after: Option<Uuid>,
    limit: u64,
) -> StoreResult<Vec<(Uuid, serde_json::Value)>> {
    use sea_orm::QuerySelect;
    let mut query = profiles::Entity::find()
        .select_only()
        .column(profiles::Column::Id)
        .column(profiles::Column::Traits)
        .filter(profiles::Column::TenantId.eq(tx.tenant_id().as_uuid()));
    if let Some(after) = after {
        query = query.filter(profiles::Column::Id.gt(after));
    }
    Ok(query
        .order_by_asc(profiles::Column::Id)
        .limit(limit)
        .into_tuple()
        .all(tx.conn())
        .await?)
}

/// Up to `limit` events after `after`, in id order: (id, profile id, properties).
pub async fn properties_page(
    tx: &TenantTx,
    after: Option<Uuid>,
    limit: u64,
) -> StoreResult<Vec<(Uuid, Uuid, serde_json::Value)>> {
    use sea_orm::QuerySelect;
    let mut query = events::Entity::find()
        .select_only()
        .column(events::Column::Id)
        .column(events::Column::ProfileId)
        .column(events::Column::Properties)
        .filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()));
    if let Some(after) = after {
        query = query.filter(events::Column::Id.gt(after));
    }
    Ok(query
        .order_by_asc(events::Column::Id)
        .limit(limit)
        .into_tuple()
        .all(tx.conn())
        .await?)
}

/// Replaces a profile's traits (sealed again after a change of the personal keys).
pub async fn set_traits(tx: &TenantTx, id: Uuid, traits: serde_json::Value) -> StoreResult<()> {
    profiles::Entity::update_many()
        .col_expr(profiles::Column::Traits, Expr::value(traits))
        .filter(profiles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(profiles::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// Replaces an event's properties (sealed again after a change of the personal keys).
pub async fn set_properties(
    tx: &TenantTx,
    id: Uuid,
    properties: serde_json::Value,
) -> StoreResult<()> {
    events::Entity::update_many()
        .col_expr(events::Column::Properties, Expr::value(properties))
        .filter(events::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(events::Column::Id.eq(id))
        .exec(tx.conn())
        .await?;
    Ok(())
}
