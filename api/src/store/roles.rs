//! Roles of a tenant and their permissions.

use chrono::{DateTime, Utc};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, Set};

use super::entity::{roles, user_roles};
use super::{StoreError, StoreResult, TenantTx};

pub use roles::Model as RoleRow;

/// Inserts a role; `permissions` are the contract's permission names.
pub async fn insert(
    tx: &TenantTx,
    name: &str,
    permissions: &[&str],
    built_in: bool,
    now: DateTime<Utc>,
) -> StoreResult<RoleRow> {
    roles::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        name: Set(name.to_owned()),
        permissions: Set(serde_json::json!(permissions)),
        built_in: Set(built_in),
        created_at: Set(now),
    }
    .insert(tx.conn())
    .await
    .map_err(|e| StoreError::unique_as_conflict(e, "a role with this name already exists"))
}

pub async fn list(tx: &TenantTx) -> StoreResult<Vec<RoleRow>> {
    Ok(roles::Entity::find()
        .filter(roles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .order_by_desc(roles::Column::BuiltIn)
        .order_by_asc(roles::Column::CreatedAt)
        .order_by_asc(roles::Column::Name)
        .all(tx.conn())
        .await?)
}

/// The roles a user holds, in one statement (authentication reads them on every request).
pub async fn of_user(tx: &TenantTx, user_id: uuid::Uuid) -> StoreResult<Vec<RoleRow>> {
    let tenant_id = tx.tenant_id().as_uuid();
    Ok(roles::Entity::find()
        .filter(roles::Column::TenantId.eq(tenant_id))
        .filter(
            roles::Column::Name.in_subquery(
                sea_orm::sea_query::Query::select()
                    .column(user_roles::Column::RoleName)
                    .from(user_roles::Entity)
                    .and_where(user_roles::Column::TenantId.eq(tenant_id))
                    .and_where(user_roles::Column::UserId.eq(user_id))
                    .to_owned(),
            ),
        )
        .all(tx.conn())
        .await?)
}

pub async fn find(tx: &TenantTx, name: &str) -> StoreResult<Option<RoleRow>> {
    Ok(roles::Entity::find()
        .filter(roles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(roles::Column::Name.eq(name))
        .one(tx.conn())
        .await?)
}

pub async fn delete(tx: &TenantTx, name: &str) -> StoreResult<()> {
    let result = roles::Entity::delete_many()
        .filter(roles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(roles::Column::Name.eq(name))
        .exec(tx.conn())
        .await?;
    if result.rows_affected == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

/// The permission names stored in a role row.
pub fn permission_names(row: &RoleRow) -> Vec<String> {
    permission_names_in(&row.permissions)
}

/// The permission names of a stored `permissions` list (what [`permission_names`] reads of a
/// role row, and authentication of the same column joined to a user).
pub fn permission_names_in(permissions: &serde_json::Value) -> Vec<String> {
    permissions
        .as_array()
        .map(|values| {
            values
                .iter()
                .filter_map(|value| value.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
