//! The key store (wrapped tenant and profile keys), the register of erasures, suppressed
//! identifiers and the consent history. Stores and deletes what it is given; it never sees a key
//! in the clear.

use chrono::{DateTime, Utc};
use sea_orm::sea_query::ArrayType;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use uuid::Uuid;

use super::entity::{consent_history, erasures, profile_keys, suppressions, tenant_keys};
use super::{StoreResult, TenantTx};

pub use consent_history::Model as ConsentChangeRow;
pub use erasures::Model as ErasureRow;
pub use tenant_keys::Model as TenantKeyRow;

/// Rows per multi-row statement.
const CHUNK: usize = 200;

/// The tenant's wrapped key, if it has one.
pub async fn tenant_key(tx: &TenantTx) -> StoreResult<Option<TenantKeyRow>> {
    Ok(tenant_keys::Entity::find()
        .filter(tenant_keys::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .one(tx.conn())
        .await?)
}

/// Stores the tenant's first key unless a concurrent transaction stored one first (then that
/// one is kept, and the caller reads it back).
pub async fn insert_tenant_key(
    tx: &TenantTx,
    master_key_id: &str,
    wrapped: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    tenant_keys::Entity::insert(tenant_keys::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        master_key_id: Set(master_key_id.to_owned()),
        wrapped: Set(wrapped.to_owned()),
        created_at: Set(now),
        rotated_at: Set(None),
    })
    .on_conflict_do_nothing_on([tenant_keys::Column::TenantId])
    .exec(tx.conn())
    .await?;
    Ok(())
}

/// Replaces the wrapping of the tenant's key (master key rotation).
pub async fn rewrap_tenant_key(
    tx: &TenantTx,
    master_key_id: &str,
    wrapped: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    tenant_keys::Entity::update_many()
        .filter(tenant_keys::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .col_expr(
            tenant_keys::Column::MasterKeyId,
            sea_orm::sea_query::Expr::value(master_key_id.to_owned()),
        )
        .col_expr(
            tenant_keys::Column::Wrapped,
            sea_orm::sea_query::Expr::value(wrapped.to_owned()),
        )
        .col_expr(
            tenant_keys::Column::RotatedAt,
            sea_orm::sea_query::Expr::value(Some(now)),
        )
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// The wrapped data keys of these profiles, as (profile id, wrapped key).
pub async fn profile_keys(tx: &TenantTx, profile_ids: &[Uuid]) -> StoreResult<Vec<(Uuid, String)>> {
    let mut out = Vec::with_capacity(profile_ids.len());
    for chunk in profile_ids.chunks(CHUNK * 2) {
        let rows = profile_keys::Entity::find()
            .filter(profile_keys::Column::TenantId.eq(tx.tenant_id().as_uuid()))
            .filter(super::any_of(
                tx.backend(),
                profile_keys::Column::ProfileId,
                ArrayType::Uuid,
                chunk.iter().copied(),
            ))
            .all(tx.conn())
            .await?;
        out.extend(rows.into_iter().map(|row| (row.profile_id, row.wrapped)));
    }
    Ok(out)
}

/// Stores new profile data keys. A unique violation means a concurrent writer created the key of
/// the same profile: the caller retries and then finds it.
pub async fn insert_profile_keys(
    tx: &TenantTx,
    keys: &[(Uuid, String)],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    let key_bytes = |(_, wrapped): &(Uuid, String)| wrapped.len() + 3 * super::wire::FIXED;
    for chunk in super::wire::chunks(tx, keys, CHUNK, key_bytes) {
        let rows = chunk
            .iter()
            .map(|(profile_id, wrapped)| profile_keys::ActiveModel {
                tenant_id: Set(tenant),
                profile_id: Set(*profile_id),
                wrapped: Set(wrapped.clone()),
                created_at: Set(now),
            });
        profile_keys::Entity::insert_many(rows)
            .exec(tx.conn())
            .await
            .map_err(|error| {
                super::StoreError::unique_as_conflict(error, "profile key created concurrently")
            })?;
    }
    Ok(())
}

/// Destroys the data keys of these profiles: what they sealed can never be opened again,
/// wherever a copy of it lives. Returns how many keys were destroyed.
pub async fn delete_profile_keys(tx: &TenantTx, profile_ids: &[Uuid]) -> StoreResult<u64> {
    let mut deleted = 0;
    for chunk in profile_ids.chunks(CHUNK * 2) {
        deleted += profile_keys::Entity::delete_many()
            .filter(profile_keys::Column::TenantId.eq(tx.tenant_id().as_uuid()))
            .filter(profile_keys::Column::ProfileId.is_in(chunk.iter().copied()))
            .exec(tx.conn())
            .await?
            .rows_affected;
    }
    Ok(deleted)
}

/// Which of these (kind, blind index) identifiers are suppressed.
pub async fn suppressed(
    tx: &TenantTx,
    keys: &[(String, String)],
) -> StoreResult<Vec<(String, String)>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let lookups: Vec<&str> = keys.iter().map(|(_, lookup)| lookup.as_str()).collect();
    let mut out = Vec::new();
    for chunk in lookups.chunks(CHUNK * 2) {
        let rows = suppressions::Entity::find()
            .filter(suppressions::Column::TenantId.eq(tx.tenant_id().as_uuid()))
            .filter(super::any_of(
                tx.backend(),
                suppressions::Column::Lookup,
                ArrayType::String,
                chunk.iter().copied(),
            ))
            .all(tx.conn())
            .await?;
        out.extend(
            rows.into_iter()
                .map(|row| (row.kind, row.lookup))
                .filter(|pair| keys.contains(pair)),
        );
    }
    Ok(out)
}

/// Suppresses identifiers (blind indexes only).
pub async fn suppress(
    tx: &TenantTx,
    keys: &[(String, String)],
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    for chunk in keys.chunks(CHUNK) {
        let rows = chunk
            .iter()
            .map(|(kind, lookup)| suppressions::ActiveModel {
                tenant_id: Set(tenant),
                kind: Set(kind.clone()),
                lookup: Set(lookup.clone()),
                created_at: Set(now),
            });
        suppressions::Entity::insert_many(rows)
            .on_conflict_do_nothing_on([
                suppressions::Column::TenantId,
                suppressions::Column::Kind,
                suppressions::Column::Lookup,
            ])
            .exec(tx.conn())
            .await?;
    }
    Ok(())
}

/// Records an erasure in the register.
pub async fn record_erasure(tx: &TenantTx, row: ErasureRow) -> StoreResult<()> {
    erasures::Entity::insert(erasures::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        profile_id: Set(row.profile_id),
        erased_at: Set(row.erased_at),
        actor: Set(row.actor),
        events_deleted: Set(row.events_deleted),
        identities_deleted: Set(row.identities_deleted),
        suppressed: Set(row.suppressed),
    })
    .on_conflict_do_nothing_on([erasures::Column::TenantId, erasures::Column::ProfileId])
    .exec(tx.conn())
    .await?;
    Ok(())
}

/// The erasure of a profile id, if it was erased.
pub async fn erasure(tx: &TenantTx, profile_id: Uuid) -> StoreResult<Option<ErasureRow>> {
    Ok(erasures::Entity::find()
        .filter(erasures::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(erasures::Column::ProfileId.eq(profile_id))
        .one(tx.conn())
        .await?)
}

/// Appends consent changes to the history.
pub async fn append_consent_changes(tx: &TenantTx, rows: &[ConsentChangeRow]) -> StoreResult<()> {
    let tenant = tx.tenant_id().as_uuid();
    let change_bytes = |row: &ConsentChangeRow| {
        row.purpose.len()
            + row.source.len()
            + row.actor.as_ref().map_or(0, String::len)
            + row.message_id.as_ref().map_or(0, String::len)
            + 5 * super::wire::FIXED
    };
    for chunk in super::wire::chunks(tx, rows, CHUNK, change_bytes) {
        let models = chunk.iter().map(|row| consent_history::ActiveModel {
            tenant_id: Set(tenant),
            id: Set(row.id),
            profile_id: Set(row.profile_id),
            purpose: Set(row.purpose.clone()),
            granted: Set(row.granted),
            source: Set(row.source.clone()),
            actor: Set(row.actor.clone()),
            message_id: Set(row.message_id.clone()),
            at: Set(row.at),
        });
        consent_history::Entity::insert_many(models)
            .exec(tx.conn())
            .await?;
    }
    Ok(())
}

/// The consent history of these profiles, oldest first.
pub async fn consent_history_of(
    tx: &TenantTx,
    profile_ids: &[Uuid],
) -> StoreResult<Vec<ConsentChangeRow>> {
    if profile_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(consent_history::Entity::find()
        .filter(consent_history::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(consent_history::Column::ProfileId.is_in(profile_ids.iter().copied()))
        .order_by_asc(consent_history::Column::At)
        .order_by_asc(consent_history::Column::Id)
        .all(tx.conn())
        .await?)
}
