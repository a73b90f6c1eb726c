//! Row-level security and the service role on PostgreSQL; nothing on SQLite, which has neither.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

/// The role the service runs as in production: it owns no table and cannot bypass row-level
/// security. Operators create a login role that is a member of it (see `docs/operations.md`).
pub const SERVICE_ROLE: &str = "cdp_app";

/// Creates the service role if it does not exist yet (roles are shared by the whole cluster, so
/// several databases of one cluster share it) and grants it what the service needs.
pub async fn ensure_service_role(manager: &SchemaManager<'_>) -> Result<(), DbErr> {
    if manager.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    let db = manager.get_connection();
    // Two migrators starting at once on a fresh cluster may race to create the role; the
    // duplicate_object handler makes the loser a no-op.
    db.execute_unprepared(&format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{SERVICE_ROLE}') THEN
             CREATE ROLE {SERVICE_ROLE} NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
           END IF;
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
         END $$;"
    ))
    .await?;
    db.execute_unprepared(&format!(
        "GRANT USAGE ON SCHEMA public TO {SERVICE_ROLE};
         GRANT SELECT ON seaql_migrations TO {SERVICE_ROLE};"
    ))
    .await?;
    Ok(())
}

/// Grants the service role data access to a table (never DDL).
pub async fn grant_table(manager: &SchemaManager<'_>, table: &str) -> Result<(), DbErr> {
    if manager.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    manager
        .get_connection()
        .execute_unprepared(&format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {SERVICE_ROLE};"
        ))
        .await?;
    Ok(())
}

/// Makes a table a tenant table: row-level security enabled and forced (so that even the owner is
/// subject to it), with the policy that a row is visible and writable only when its `tenant_id` is
/// the transaction's `app.tenant_id`. `current_setting` without `missing_ok` makes a query with no
/// tenant set fail instead of silently returning nothing.
pub async fn protect_tenant_table(manager: &SchemaManager<'_>, table: &str) -> Result<(), DbErr> {
    grant_table(manager, table).await?;
    if manager.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    manager
        .get_connection()
        .execute_unprepared(&format!(
            "ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
             ALTER TABLE {table} FORCE ROW LEVEL SECURITY;
             CREATE POLICY tenant_isolation ON {table}
               USING (tenant_id = current_setting('app.tenant_id')::uuid)
               WITH CHECK (tenant_id = current_setting('app.tenant_id')::uuid);"
        ))
        .await?;
    Ok(())
}

/// Additionally lets explicit system transactions (`Store::begin_system`, which sets `app.system`)
/// see every tenant's rows of this table. Only tables that background jobs must scan across tenants
/// get this policy, for example the email outbox.
pub async fn allow_system_scan(manager: &SchemaManager<'_>, table: &str) -> Result<(), DbErr> {
    if manager.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    manager
        .get_connection()
        .execute_unprepared(&format!(
            "CREATE POLICY system_scan ON {table}
               USING (current_setting('app.system', true) = 'on')
               WITH CHECK (current_setting('app.system', true) = 'on');"
        ))
        .await?;
    Ok(())
}
