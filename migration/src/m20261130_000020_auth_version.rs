//! A version of what authenticating a tenant's users reads: `tenants.auth_version`, raised by
//! triggers on every change to `users`, `user_roles` and `roles`, and on every change to whether a
//! session family is revoked (`refresh_sessions.revoked_at`).
//!
//! Every request with an access token checks its user's standing (status, e-mail, the session
//! family's revocation, the roles' permissions). Each process keeps the standings it read, keyed
//! by this version (`api::auth::standing`), and reads the version with the statement that binds a
//! read transaction's tenant (PostgreSQL) or with one primary-key lookup (SQLite): a change
//! committed anywhere (another replica, the command line, a restore, a hand-written `UPDATE`)
//! takes effect at the next request, as when every request read the standing (ADR 0017).
//!
//! Versions never come back within a database: every raise, of this version and of
//! `definitions_version` (migration 19, whose triggers this migration moves to the same source),
//! takes the next value of one database-wide counter (the sequence `cdp_versions` on PostgreSQL,
//! the one-row table `cdp_versions` on SQLite), and a new tenant row starts from it too. A tenant
//! deleted and created again, or restored, cannot meet a version that a process holds for its
//! older state. (A whole database restored to an earlier copy brings the counter back with it:
//! `docs/operations.md` says to restart the service after that.)

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

use crate::m20261129_000019_definitions_version::{
    self as definitions, DEFINITION_TABLES, ROW_EVENTS,
};
use crate::tenancy::SERVICE_ROLE;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261130_000020_auth_version"
    }
}

/// The tables whose every change changes some user's standing.
const AUTH_TABLES: [&str; 3] = ["users", "user_roles", "roles"];

/// PostgreSQL: the row trigger function `name` that raises the changed row's tenant's `column`
/// to the counter's next value.
fn postgres_raise_function(name: &str, column: &str) -> String {
    format!(
        "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger
         LANGUAGE plpgsql AS $fn$
         BEGIN
           UPDATE tenants SET {column} = nextval('cdp_versions')
           WHERE id = CASE WHEN TG_OP = 'DELETE' THEN OLD.tenant_id ELSE NEW.tenant_id END;
           RETURN NULL;
         END
         $fn$;"
    )
}

/// SQLite: the trigger `name` after `event` on `table`, for the rows where `when` holds, that
/// raises the changed row's (`row`'s) tenant's `column` to the counter's next value.
fn sqlite_raise_trigger(
    name: &str,
    event: &str,
    table: &str,
    row: &str,
    when: Option<&str>,
    column: &str,
) -> String {
    let when = when.map(|when| format!("WHEN {when}")).unwrap_or_default();
    format!(
        "CREATE TRIGGER {name} AFTER {event} ON {table} {when}
         BEGIN
           UPDATE cdp_versions SET value = value + 1 WHERE id = 1;
           UPDATE tenants SET {column} = (SELECT value FROM cdp_versions WHERE id = 1)
           WHERE id = {row}.tenant_id;
         END;"
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                // The counter starts past every version already handed out.
                db.execute_unprepared(&format!(
                    "CREATE SEQUENCE cdp_versions;
                     SELECT setval('cdp_versions',
                                   (SELECT COALESCE(MAX(definitions_version), 0) + 1 FROM tenants));
                     GRANT USAGE ON SEQUENCE cdp_versions TO {SERVICE_ROLE};
                     ALTER TABLE tenants
                       ADD COLUMN auth_version BIGINT NOT NULL DEFAULT nextval('cdp_versions');
                     ALTER TABLE tenants
                       ALTER COLUMN definitions_version SET DEFAULT nextval('cdp_versions');"
                ))
                .await?;
                for (function, column) in [
                    ("cdp_auth_changed", "auth_version"),
                    ("cdp_definitions_changed", "definitions_version"),
                ] {
                    db.execute_unprepared(&postgres_raise_function(function, column))
                        .await?;
                }
                for table in AUTH_TABLES {
                    db.execute_unprepared(&format!(
                        "CREATE TRIGGER {table}_auth_changed
                           AFTER INSERT OR UPDATE OR DELETE ON {table}
                           FOR EACH ROW EXECUTE FUNCTION cdp_auth_changed();"
                    ))
                    .await?;
                }
                // Sessions are inserted at every login and refresh; only a revocation, or a
                // revoked row going away, changes a standing.
                db.execute_unprepared(
                    "CREATE TRIGGER refresh_sessions_auth_inserted
                       AFTER INSERT ON refresh_sessions FOR EACH ROW
                       WHEN (NEW.revoked_at IS NOT NULL) EXECUTE FUNCTION cdp_auth_changed();
                     CREATE TRIGGER refresh_sessions_auth_updated
                       AFTER UPDATE ON refresh_sessions FOR EACH ROW
                       WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
                             OR OLD.family_id IS DISTINCT FROM NEW.family_id
                             OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id)
                       EXECUTE FUNCTION cdp_auth_changed();
                     CREATE TRIGGER refresh_sessions_auth_deleted
                       AFTER DELETE ON refresh_sessions FOR EACH ROW
                       WHEN (OLD.revoked_at IS NOT NULL) EXECUTE FUNCTION cdp_auth_changed();",
                )
                .await?;
            }
            _ => {
                db.execute_unprepared(
                    "CREATE TABLE cdp_versions (
                       id INTEGER PRIMARY KEY CHECK (id = 1),
                       value BIGINT NOT NULL
                     );
                     INSERT INTO cdp_versions (id, value)
                       SELECT 1, COALESCE(MAX(definitions_version), 0) + 1 FROM tenants;
                     ALTER TABLE tenants ADD COLUMN auth_version BIGINT NOT NULL DEFAULT 0;
                     UPDATE tenants SET auth_version = (SELECT value FROM cdp_versions);",
                )
                .await?;
                // A new tenant row takes both versions from the counter (SQLite's defaults
                // cannot read a table).
                db.execute_unprepared(
                    "CREATE TRIGGER tenants_versions_insert AFTER INSERT ON tenants
                     BEGIN
                       UPDATE cdp_versions SET value = value + 1 WHERE id = 1;
                       UPDATE tenants
                          SET auth_version = (SELECT value FROM cdp_versions WHERE id = 1),
                              definitions_version = (SELECT value FROM cdp_versions WHERE id = 1)
                        WHERE id = NEW.id;
                     END;",
                )
                .await?;
                // Sessions: only what can change a family's revocation (as on PostgreSQL).
                let session_changes = [
                    "NEW.revoked_at IS NOT NULL",
                    "OLD.revoked_at IS NOT NEW.revoked_at \
                     OR OLD.family_id IS NOT NEW.family_id \
                     OR OLD.tenant_id IS NOT NEW.tenant_id",
                    "OLD.revoked_at IS NOT NULL",
                ];
                for ((event, row), when) in ROW_EVENTS.into_iter().zip(session_changes) {
                    let kind = event.to_lowercase();
                    let name = format!("refresh_sessions_auth_{kind}");
                    let table = "refresh_sessions";
                    let trigger =
                        sqlite_raise_trigger(&name, event, table, row, Some(when), "auth_version");
                    db.execute_unprepared(&trigger).await?;
                }
                for (event, row) in ROW_EVENTS {
                    let kind = event.to_lowercase();
                    for table in AUTH_TABLES {
                        let name = format!("{table}_auth_{kind}");
                        let trigger =
                            sqlite_raise_trigger(&name, event, table, row, None, "auth_version");
                        db.execute_unprepared(&trigger).await?;
                    }
                    // Migration 19's triggers, moved to the counter.
                    for table in DEFINITION_TABLES {
                        let name = format!("{table}_definitions_{kind}");
                        let trigger = sqlite_raise_trigger(
                            &name,
                            event,
                            table,
                            row,
                            None,
                            "definitions_version",
                        );
                        db.execute_unprepared(&format!("DROP TRIGGER {name}; {trigger}"))
                            .await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                for table in AUTH_TABLES {
                    db.execute_unprepared(&format!(
                        "DROP TRIGGER IF EXISTS {table}_auth_changed ON {table}"
                    ))
                    .await?;
                }
                db.execute_unprepared(
                    "DROP TRIGGER IF EXISTS refresh_sessions_auth_inserted ON refresh_sessions;
                     DROP TRIGGER IF EXISTS refresh_sessions_auth_updated ON refresh_sessions;
                     DROP TRIGGER IF EXISTS refresh_sessions_auth_deleted ON refresh_sessions;
                     DROP FUNCTION IF EXISTS cdp_auth_changed();",
                )
                .await?;
                // Migration 19's function again.
                db.execute_unprepared(definitions::POSTGRES_FUNCTION)
                    .await?;
                db.execute_unprepared(
                    "ALTER TABLE tenants ALTER COLUMN definitions_version SET DEFAULT 0;
                     ALTER TABLE tenants DROP COLUMN auth_version;
                     DROP SEQUENCE cdp_versions;",
                )
                .await?;
            }
            _ => {
                for table in AUTH_TABLES.iter().chain(["refresh_sessions"].iter()) {
                    for kind in ["insert", "update", "delete"] {
                        db.execute_unprepared(&format!(
                            "DROP TRIGGER IF EXISTS {table}_auth_{kind}"
                        ))
                        .await?;
                    }
                }
                // Migration 19's triggers again.
                for table in DEFINITION_TABLES {
                    for (event, row) in ROW_EVENTS {
                        let kind = event.to_lowercase();
                        let trigger = definitions::sqlite_trigger(table, event, row);
                        db.execute_unprepared(&format!(
                            "DROP TRIGGER IF EXISTS {table}_definitions_{kind}; {trigger}"
                        ))
                        .await?;
                    }
                }
                db.execute_unprepared(
                    "DROP TRIGGER IF EXISTS tenants_versions_insert;
                     ALTER TABLE tenants DROP COLUMN auth_version;
                     DROP TABLE cdp_versions;",
                )
                .await?;
            }
        }
        Ok(())
    }
}
