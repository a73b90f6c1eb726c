//! Users of a tenant and their role assignments.

use chrono::{DateTime, Utc};
use domain::{Email, UserId, UserStatus};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};
use uuid::Uuid;

use super::entity::{refresh_sessions, roles, user_roles, users};
use super::{StoreError, StoreResult, TenantTx};

pub use users::Model as UserRow;

/// What authenticating a user's access token checks, read in one statement.
#[derive(Debug, Clone)]
pub struct Standing {
    pub status: String,
    pub email: String,
    /// Whether the session family the token belongs to was revoked (logout, refresh reuse).
    pub family_revoked: bool,
    /// The `permissions` of each role the user holds.
    pub role_permissions: Vec<serde_json::Value>,
}

/// A user's [`Standing`] for a token of session family `family_id`, or `None` for no such user:
/// the user row joined to its roles, with the family's revocation as a subquery. On PostgreSQL
/// through `cdp_user_standing`, the same query planned once per connection (see the migration
/// `m20261129_000017_user_standing`).
pub async fn standing(
    tx: &TenantTx,
    user_id: UserId,
    family_id: Uuid,
) -> StoreResult<Option<Standing>> {
    use sea_orm::sea_query::{Condition, ExprTrait, Query};
    use sea_orm::{ConnectionTrait, DbBackend, Statement};
    let tenant = tx.tenant_id().as_uuid();
    if tx.backend() == super::Backend::Postgres {
        let rows = tx
            .conn()
            .query_all_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT status, email, family_revoked, permissions \
                 FROM cdp_user_standing($1, $2, $3)",
                [tenant.into(), user_id.as_uuid().into(), family_id.into()],
            ))
            .await?;
        return standing_of(&rows);
    }
    let revoked = Query::select()
        .expr(Expr::val(1))
        .from(refresh_sessions::Entity)
        .and_where(Expr::col(refresh_sessions::Column::TenantId).eq(tenant))
        .and_where(Expr::col(refresh_sessions::Column::FamilyId).eq(family_id))
        .and_where(Expr::col(refresh_sessions::Column::RevokedAt).is_not_null())
        .to_owned();
    let query = Query::select()
        .column((users::Entity, users::Column::Status))
        .column((users::Entity, users::Column::Email))
        .expr(Expr::exists(revoked))
        .column((roles::Entity, roles::Column::Permissions))
        .from(users::Entity)
        .left_join(
            user_roles::Entity,
            Condition::all()
                .add(
                    Expr::col((user_roles::Entity, user_roles::Column::TenantId))
                        .equals((users::Entity, users::Column::TenantId)),
                )
                .add(
                    Expr::col((user_roles::Entity, user_roles::Column::UserId))
                        .equals((users::Entity, users::Column::Id)),
                ),
        )
        .left_join(
            roles::Entity,
            Condition::all()
                .add(
                    Expr::col((roles::Entity, roles::Column::TenantId))
                        .equals((user_roles::Entity, user_roles::Column::TenantId)),
                )
                .add(
                    Expr::col((roles::Entity, roles::Column::Name))
                        .equals((user_roles::Entity, user_roles::Column::RoleName)),
                ),
        )
        .and_where(Expr::col((users::Entity, users::Column::TenantId)).eq(tenant))
        .and_where(Expr::col((users::Entity, users::Column::Id)).eq(user_id.as_uuid()))
        .to_owned();
    let rows = tx.conn().query_all(&query).await?;
    standing_of(&rows)
}

/// The standing in the rows of the standing query: one per role, or one with no permissions.
fn standing_of(rows: &[sea_orm::QueryResult]) -> StoreResult<Option<Standing>> {
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut standing = Standing {
        status: first.try_get_by_index(0)?,
        email: first.try_get_by_index(1)?,
        family_revoked: first.try_get_by_index(2)?,
        role_permissions: Vec::with_capacity(rows.len()),
    };
    for row in rows {
        if let Some(permissions) = row.try_get_by_index::<Option<serde_json::Value>>(3)? {
            standing.role_permissions.push(permissions);
        }
    }
    Ok(Some(standing))
}

pub async fn insert(
    tx: &TenantTx,
    user_id: UserId,
    email: &Email,
    status: UserStatus,
    now: DateTime<Utc>,
) -> StoreResult<UserRow> {
    users::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        id: Set(user_id.as_uuid()),
        email: Set(email.as_str().to_owned()),
        password_hash: Set(None),
        status: Set(status.as_str().to_owned()),
        created_at: Set(now),
        updated_at: Set(now),
    }
    .insert(tx.conn())
    .await
    .map_err(|e| StoreError::unique_as_conflict(e, "a user with this email already exists"))
}

pub async fn get(tx: &TenantTx, user_id: UserId) -> StoreResult<UserRow> {
    users::Entity::find()
        .filter(users::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(users::Column::Id.eq(user_id.as_uuid()))
        .one(tx.conn())
        .await?
        .ok_or(StoreError::NotFound)
}

pub async fn find_by_email(tx: &TenantTx, email: &Email) -> StoreResult<Option<UserRow>> {
    Ok(users::Entity::find()
        .filter(users::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(users::Column::Email.eq(email.as_str()))
        .one(tx.conn())
        .await?)
}

/// How many users the tenant has, whatever their status.
pub async fn count(tx: &TenantTx) -> StoreResult<u64> {
    Ok(users::Entity::find()
        .filter(users::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .count(tx.conn())
        .await?)
}

/// One page of users in creation order (ids are time-ordered), after the cursor id.
pub async fn page(
    tx: &TenantTx,
    after: Option<Uuid>,
    limit: u64,
) -> StoreResult<(Vec<UserRow>, u64)> {
    let base = users::Entity::find().filter(users::Column::TenantId.eq(tx.tenant_id().as_uuid()));
    let total = base.clone().count(tx.conn()).await?;
    let mut query = base.order_by_asc(users::Column::Id).limit(limit);
    if let Some(after) = after {
        query = query.filter(users::Column::Id.gt(after));
    }
    Ok((query.all(tx.conn()).await?, total))
}

pub async fn set_status(
    tx: &TenantTx,
    user_id: UserId,
    status: UserStatus,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let result = users::Entity::update_many()
        .col_expr(users::Column::Status, Expr::value(status.as_str()))
        .col_expr(users::Column::UpdatedAt, Expr::value(now))
        .filter(users::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(users::Column::Id.eq(user_id.as_uuid()))
        .exec(tx.conn())
        .await?;
    if result.rows_affected == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

pub async fn set_password_hash(
    tx: &TenantTx,
    user_id: UserId,
    password_hash: &str,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let result = users::Entity::update_many()
        .col_expr(users::Column::PasswordHash, Expr::value(password_hash))
        .col_expr(users::Column::UpdatedAt, Expr::value(now))
        .filter(users::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(users::Column::Id.eq(user_id.as_uuid()))
        .exec(tx.conn())
        .await?;
    if result.rows_affected == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

/// The role names of one user, sorted.
pub async fn roles_of(tx: &TenantTx, user_id: UserId) -> StoreResult<Vec<String>> {
    let rows = user_roles::Entity::find()
        .filter(user_roles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(user_roles::Column::UserId.eq(user_id.as_uuid()))
        .order_by_asc(user_roles::Column::RoleName)
        .all(tx.conn())
        .await?;
    Ok(rows.into_iter().map(|row| row.role_name).collect())
}

/// The role names of several users at once, to avoid one query per user in a list.
pub async fn roles_of_many(tx: &TenantTx, user_ids: &[Uuid]) -> StoreResult<Vec<(Uuid, String)>> {
    let rows = user_roles::Entity::find()
        .filter(user_roles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(user_roles::Column::UserId.is_in(user_ids.iter().copied()))
        .order_by_asc(user_roles::Column::RoleName)
        .all(tx.conn())
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| (row.user_id, row.role_name))
        .collect())
}

/// Replaces a user's roles. Every name must exist in the tenant (the foreign key guarantees it;
/// the service checks first to give a clear message).
pub async fn set_roles(tx: &TenantTx, user_id: UserId, role_names: &[String]) -> StoreResult<()> {
    user_roles::Entity::delete_many()
        .filter(user_roles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(user_roles::Column::UserId.eq(user_id.as_uuid()))
        .exec(tx.conn())
        .await?;
    if role_names.is_empty() {
        return Ok(());
    }
    let rows = role_names.iter().map(|name| user_roles::ActiveModel {
        tenant_id: Set(tx.tenant_id().as_uuid()),
        user_id: Set(user_id.as_uuid()),
        role_name: Set(name.clone()),
    });
    user_roles::Entity::insert_many(rows)
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// How many active users hold the owner role.
pub async fn count_active_owners(tx: &TenantTx) -> StoreResult<u64> {
    let owner_ids: Vec<Uuid> = user_roles::Entity::find()
        .filter(user_roles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(user_roles::Column::RoleName.eq(domain::BuiltInRole::Owner.name()))
        .all(tx.conn())
        .await?
        .into_iter()
        .map(|row| row.user_id)
        .collect();
    if owner_ids.is_empty() {
        return Ok(0);
    }
    Ok(users::Entity::find()
        .filter(users::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(users::Column::Id.is_in(owner_ids))
        .filter(users::Column::Status.eq(UserStatus::Active.as_str()))
        .count(tx.conn())
        .await?)
}

/// How many users hold a role.
pub async fn count_with_role(tx: &TenantTx, role_name: &str) -> StoreResult<u64> {
    Ok(user_roles::Entity::find()
        .filter(user_roles::Column::TenantId.eq(tx.tenant_id().as_uuid()))
        .filter(user_roles::Column::RoleName.eq(role_name))
        .count(tx.conn())
        .await?)
}
