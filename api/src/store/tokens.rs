//! One-time tokens (account activation, password reset), stored only as hashes.

use chrono::{DateTime, Utc};
use domain::UserId;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};
use uuid::Uuid;

use super::entity::one_time_tokens;
use super::{StoreResult, TenantTx};

pub use one_time_tokens::Model as TokenRow;

pub async fn insert(
    tx: &TenantTx,
    user_id: UserId,
    purpose: &str,
    token_hash: &str,
    now: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> StoreResult<TokenRow> {
    Ok(one_time_tokens::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        id: Set(Uuid::now_v7()),
        user_id: Set(user_id.as_uuid()),
        purpose: Set(purpose.to_owned()),
        token_hash: Set(token_hash.to_owned()),
        created_at: Set(now),
        expires_at: Set(expires_at),
        used_at: Set(None),
    }
    .insert(tx.conn())
    .await?)
}

pub async fn find_by_hash(tx: &TenantTx, token_hash: &str) -> StoreResult<Option<TokenRow>> {
    Ok(one_time_tokens::Entity::find()
        .filter(one_time_tokens::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(one_time_tokens::Column::TokenHash.eq(token_hash))
        .one(tx.conn())
        .await?)
}

/// Marks a token used. Returns false when it was already used, so that two concurrent uses of
/// one token cannot both succeed.
pub async fn consume(tx: &TenantTx, id: Uuid, now: DateTime<Utc>) -> StoreResult<bool> {
    let result = one_time_tokens::Entity::update_many()
        .col_expr(one_time_tokens::Column::UsedAt, Expr::value(now))
        .filter(one_time_tokens::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(one_time_tokens::Column::Id.eq(id))
        .filter(one_time_tokens::Column::UsedAt.is_null())
        .exec(tx.conn())
        .await?;
    Ok(result.rows_affected == 1)
}

/// Retires every unused token of a user for one purpose (a new invitation or reset replaces the
/// older ones).
pub async fn retire_unused(
    tx: &TenantTx,
    user_id: UserId,
    purpose: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    one_time_tokens::Entity::update_many()
        .col_expr(one_time_tokens::Column::UsedAt, Expr::value(now))
        .filter(one_time_tokens::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(one_time_tokens::Column::UserId.eq(user_id.as_uuid()))
        .filter(one_time_tokens::Column::Purpose.eq(purpose))
        .filter(one_time_tokens::Column::UsedAt.is_null())
        .exec(tx.conn())
        .await?;
    Ok(())
}
