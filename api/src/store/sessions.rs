//! Refresh sessions: one row per refresh token, grouped into families that rotate together.

use chrono::{DateTime, Utc};
use domain::UserId;
use sea_orm::sea_query::Expr;
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, Set};
use uuid::Uuid;

use super::entity::refresh_sessions;
use super::{StoreResult, TenantTx};

pub use refresh_sessions::Model as SessionRow;

pub struct NewSession<'a> {
    pub family_id: Uuid,
    pub user_id: UserId,
    pub token_hash: &'a str,
    pub expires_at: DateTime<Utc>,
    pub ip: Option<&'a str>,
}

pub async fn insert(
    tx: &TenantTx,
    session: NewSession<'_>,
    now: DateTime<Utc>,
) -> StoreResult<SessionRow> {
    Ok(refresh_sessions::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        id: Set(Uuid::now_v7()),
        family_id: Set(session.family_id),
        user_id: Set(session.user_id.as_uuid()),
        token_hash: Set(session.token_hash.to_owned()),
        created_at: Set(now),
        expires_at: Set(session.expires_at),
        used_at: Set(None),
        revoked_at: Set(None),
        ip: Set(session.ip.map(str::to_owned)),
    }
    .insert(tx.conn())
    .await?)
}

pub async fn find_by_hash(tx: &TenantTx, token_hash: &str) -> StoreResult<Option<SessionRow>> {
    Ok(refresh_sessions::Entity::find()
        .filter(refresh_sessions::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(refresh_sessions::Column::TokenHash.eq(token_hash))
        .one(tx.conn())
        .await?)
}

/// Marks a refresh token used. Returns false when it already was (a replay).
pub async fn mark_used(tx: &TenantTx, id: Uuid, now: DateTime<Utc>) -> StoreResult<bool> {
    let result = refresh_sessions::Entity::update_many()
        .col_expr(refresh_sessions::Column::UsedAt, Expr::value(now))
        .filter(refresh_sessions::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(refresh_sessions::Column::Id.eq(id))
        .filter(refresh_sessions::Column::UsedAt.is_null())
        .exec(tx.conn())
        .await?;
    Ok(result.rows_affected == 1)
}

pub async fn revoke_family(tx: &TenantTx, family_id: Uuid, now: DateTime<Utc>) -> StoreResult<()> {
    refresh_sessions::Entity::update_many()
        .col_expr(refresh_sessions::Column::RevokedAt, Expr::value(now))
        .filter(refresh_sessions::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(refresh_sessions::Column::FamilyId.eq(family_id))
        .filter(refresh_sessions::Column::RevokedAt.is_null())
        .exec(tx.conn())
        .await?;
    Ok(())
}

pub async fn revoke_all_of_user(
    tx: &TenantTx,
    user_id: UserId,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    refresh_sessions::Entity::update_many()
        .col_expr(refresh_sessions::Column::RevokedAt, Expr::value(now))
        .filter(refresh_sessions::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(refresh_sessions::Column::UserId.eq(user_id.as_uuid()))
        .filter(refresh_sessions::Column::RevokedAt.is_null())
        .exec(tx.conn())
        .await?;
    Ok(())
}
