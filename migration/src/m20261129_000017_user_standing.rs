//! `cdp_user_standing`, on PostgreSQL: what authenticating a request reads about its user (status,
//! e-mail, the session family's revocation, the permissions of each role), as a function whose
//! query is planned once per connection.
//!
//! The service plans every statement with its actual parameters (`plan_cache_mode =
//! force_custom_plan`, `api::store::Store::connect`), which the write path needs. This statement,
//! run by every authenticated request, joins four tables under row-level security, and planning it
//! cost about 250 µs of the database's CPU each time against 40 µs to run it (docs/PERFORMANCE.md,
//! "The authentication statement"). Inside the function PL/pgSQL keeps its plan for the session
//! and the function's own `SET` makes it a generic plan: every lookup in it is by primary key or
//! by `(tenant_id, family_id)`, whatever the tenant or the statistics.
//!
//! `SECURITY INVOKER`: it runs as the caller, so row-level security applies as to the statement it
//! replaces. Nothing on SQLite, where the store runs the same query itself.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261129_000017_user_standing"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE OR REPLACE FUNCTION cdp_user_standing(p_tenant uuid, p_user uuid, p_family uuid)
                 RETURNS TABLE(status text, email text, family_revoked boolean, permissions jsonb)
                 LANGUAGE plpgsql STABLE SECURITY INVOKER
                 SET plan_cache_mode = force_generic_plan
                 AS $$
                 BEGIN
                   RETURN QUERY
                   SELECT u.status, u.email,
                          EXISTS (SELECT 1 FROM refresh_sessions s
                                   WHERE s.tenant_id = p_tenant AND s.family_id = p_family
                                     AND s.revoked_at IS NOT NULL),
                          r.permissions
                     FROM users u
                     LEFT JOIN user_roles ur ON ur.tenant_id = u.tenant_id AND ur.user_id = u.id
                     LEFT JOIN roles r ON r.tenant_id = ur.tenant_id AND r.name = ur.role_name
                    WHERE u.tenant_id = p_tenant AND u.id = p_user;
                 END $$;",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared("DROP FUNCTION IF EXISTS cdp_user_standing(uuid, uuid, uuid);")
            .await?;
        Ok(())
    }
}
