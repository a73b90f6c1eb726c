//! API keys of a tenant, stored as hashes with a visible prefix.

use chrono::{DateTime, Utc};
use domain::ApiKeyId;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};
use uuid::Uuid;

use super::entity::api_keys;
use super::{StoreError, StoreResult, TenantTx};

pub use api_keys::Model as ApiKeyRow;

pub struct NewApiKey<'a> {
    pub id: ApiKeyId,
    pub name: &'a str,
    pub scope: &'a str,
    pub prefix: &'a str,
    pub key_hash: &'a str,
    pub created_by: Option<Uuid>,
    pub channel: &'a str,
}

pub async fn insert(
    tx: &TenantTx,
    key: NewApiKey<'_>,
    now: DateTime<Utc>,
) -> StoreResult<ApiKeyRow> {
    Ok(api_keys::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        id: Set(key.id.as_uuid()),
        name: Set(key.name.to_owned()),
        scope: Set(key.scope.to_owned()),
        prefix: Set(key.prefix.to_owned()),
        key_hash: Set(key.key_hash.to_owned()),
        created_by: Set(key.created_by),
        created_at: Set(now),
        revoked_at: Set(None),
        channel: Set(key.channel.to_owned()),
    }
    .insert(tx.conn())
    .await?)
}

pub async fn list(tx: &TenantTx) -> StoreResult<Vec<ApiKeyRow>> {
    Ok(api_keys::Entity::find()
        .filter(api_keys::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .order_by_asc(api_keys::Column::Id)
        .all(tx.conn())
        .await?)
}

pub async fn get(tx: &TenantTx, id: ApiKeyId) -> StoreResult<ApiKeyRow> {
    api_keys::Entity::find()
        .filter(api_keys::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(api_keys::Column::Id.eq(id.as_uuid()))
        .one(tx.conn())
        .await?
        .ok_or(StoreError::NotFound)
}

/// The key with this hash, whether revoked or not.
pub async fn find_by_hash(tx: &TenantTx, key_hash: &str) -> StoreResult<Option<ApiKeyRow>> {
    Ok(api_keys::Entity::find()
        .filter(api_keys::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(api_keys::Column::KeyHash.eq(key_hash))
        .one(tx.conn())
        .await?)
}

/// Revokes a key; revoking twice keeps the first revocation time.
pub async fn revoke(tx: &TenantTx, id: ApiKeyId, now: DateTime<Utc>) -> StoreResult<ApiKeyRow> {
    api_keys::Entity::update_many()
        .col_expr(api_keys::Column::RevokedAt, Expr::value(now))
        .filter(api_keys::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(api_keys::Column::Id.eq(id.as_uuid()))
        .filter(api_keys::Column::RevokedAt.is_null())
        .exec(tx.conn())
        .await?;
    get(tx, id).await
}
