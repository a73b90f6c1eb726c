//! The tenant registry.

use chrono::{DateTime, Utc};
use domain::{TenantId, TenantName, TenantSlug};
use sea_orm::{ActiveModelTrait, ColumnTrait, EntityTrait, NotSet, QueryFilter, Set};

use super::entity::tenants;
use super::{Store, StoreError, StoreResult, TenantTx};

pub use tenants::Model as TenantRow;

/// Creates the tenant of this transaction. Fails with `Conflict` when the slug is taken.
pub async fn create(
    tx: &TenantTx,
    slug: &TenantSlug,
    name: &TenantName,
    now: DateTime<Utc>,
) -> StoreResult<TenantRow> {
    let row = tenants::ActiveModel {
        id: Set(tx.tenant_id().as_uuid()),
        slug: Set(slug.as_str().to_owned()),
        name: Set(name.as_str().to_owned()),
        settings: Set(serde_json::json!({})),
        created_at: Set(now),
        // The database's default; its triggers raise it.
        definitions_version: NotSet,
    };
    row.insert(tx.conn())
        .await
        .map_err(|e| StoreError::unique_as_conflict(e, "this tenant slug is taken"))
}

/// The tenant of this transaction.
pub async fn get(tx: &TenantTx) -> StoreResult<TenantRow> {
    tenants::Entity::find_by_id(tx.tenant_id().as_uuid())
        .one(tx.conn())
        .await?
        .ok_or(StoreError::NotFound)
}

/// The tenant's `auth_version`, which the database raises with every change to what
/// authenticating its users reads (migration `m20261130_000020_auth_version`, ADR 0017): as the
/// transaction read it when it was opened (PostgreSQL's read transactions), else by its key.
pub async fn auth_version(tx: &TenantTx) -> StoreResult<i64> {
    use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
    use sea_orm::ConnectionTrait;
    if let Some(version) = tx.auth_version_read() {
        return Ok(version);
    }
    // Not a column of the entity, so that no write through it can set the version: only the
    // database's default and triggers do (ADR 0017).
    let mut query = Query::select();
    query
        .column(Alias::new("auth_version"))
        .from(tenants::Entity)
        .and_where(Expr::col(tenants::Column::Id).eq(tx.tenant_id().as_uuid()));
    let statement = tx.conn().get_database_backend().build(&query);
    let row = tx
        .conn()
        .query_one_raw(statement)
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(row.try_get_by_index::<i64>(0)?)
}

/// Resolves a slug to its tenant, before any tenant is known (login, password reset).
pub async fn find_by_slug(store: &Store, slug: &str) -> StoreResult<Option<TenantRow>> {
    Ok(tenants::Entity::find()
        .filter(tenants::Column::Slug.eq(slug))
        .one(store.registry())
        .await?)
}

/// Resolves an id to its tenant (command line, api keys).
pub async fn find_by_id(store: &Store, tenant_id: TenantId) -> StoreResult<Option<TenantRow>> {
    Ok(tenants::Entity::find_by_id(tenant_id.as_uuid())
        .one(store.registry())
        .await?)
}

/// Every tenant, by slug (the operator's `cdp tenant list`).
pub async fn list(store: &Store) -> StoreResult<Vec<TenantRow>> {
    use sea_orm::QueryOrder;
    Ok(tenants::Entity::find()
        .order_by_asc(tenants::Column::Slug)
        .all(store.registry())
        .await?)
}

/// One section of the tenant's settings document (`ingest`, `campaigns`, `privacy`), or its
/// default when the section is absent or does not read as `T`.
pub async fn settings_section<T: serde::de::DeserializeOwned + Default>(
    tx: &TenantTx,
    name: &str,
) -> StoreResult<T> {
    Ok(section_of(&get(tx).await?, name))
}

/// [`settings_section`] of a tenant row already read.
pub fn section_of<T: serde::de::DeserializeOwned + Default>(row: &TenantRow, name: &str) -> T {
    row.settings
        .get(name)
        .cloned()
        .and_then(|value| serde_json::from_value(value).ok())
        .unwrap_or_default()
}

/// Replaces one section of the tenant's settings document, leaving the others as they are.
pub async fn set_settings_section(
    tx: &TenantTx,
    name: &str,
    value: serde_json::Value,
) -> StoreResult<()> {
    let mut document = get(tx).await?.settings;
    if !document.is_object() {
        document = serde_json::json!({});
    }
    document[name] = value;
    set_settings(tx, document).await
}

/// Replaces the settings document of this transaction's tenant.
pub async fn set_settings(tx: &TenantTx, settings: serde_json::Value) -> StoreResult<()> {
    tenants::Entity::update_many()
        .col_expr(
            tenants::Column::Settings,
            sea_orm::sea_query::Expr::value(settings),
        )
        .filter(tenants::Column::Id.eq(tx.tenant_id().as_uuid()))
        .exec(tx.conn())
        .await?;
    Ok(())
}

/// Up to `limit` tenant ids after `after`, in id order: background jobs walk every tenant in
/// bounded pages.
pub async fn ids_page(
    store: &Store,
    after: Option<TenantId>,
    limit: u64,
) -> StoreResult<Vec<TenantId>> {
    use sea_orm::{QueryOrder, QuerySelect};
    let mut query = tenants::Entity::find()
        .select_only()
        .column(tenants::Column::Id);
    if let Some(after) = after {
        query = query.filter(tenants::Column::Id.gt(after.as_uuid()));
    }
    let ids: Vec<uuid::Uuid> = query
        .order_by_asc(tenants::Column::Id)
        .limit(limit)
        .into_tuple()
        .all(store.registry())
        .await?;
    Ok(ids.into_iter().map(TenantId).collect())
}
