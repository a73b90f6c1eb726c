//! A version of each tenant's definitions: `tenants.definitions_version`, raised by triggers on
//! every change to the tables that say how the tenant's data is understood and acted on
//! (`segments`, `lifecycle_stages`, `campaigns`, `webhooks`).
//!
//! Every ingestion batch needs those definitions. It reads the tenant's row anyway (its privacy
//! settings), so it reads the version with it and takes the definitions from a per-process cache
//! when the version is the one the cache holds (`service::definitions`): four statements a batch
//! fewer. Triggers, not the code that writes those tables, keep the version: no write path can
//! forget it, a restore or a manual change included, and every replica sees a change with the
//! transaction that makes it.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261129_000019_definitions_version"
    }
}

/// The tables whose rows are the tenant's definitions.
pub(crate) const DEFINITION_TABLES: [&str; 4] =
    ["segments", "lifecycle_stages", "campaigns", "webhooks"];

/// PostgreSQL: the trigger function this migration creates (migration 20 replaces it and puts it
/// back when undone).
pub(crate) const POSTGRES_FUNCTION: &str = "
CREATE OR REPLACE FUNCTION cdp_definitions_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
  UPDATE tenants SET definitions_version = definitions_version + 1
  WHERE id = CASE WHEN TG_OP = 'DELETE' THEN OLD.tenant_id ELSE NEW.tenant_id END;
  RETURN NULL;
END
$fn$;";

/// The kinds of row change, each with the row a trigger reads the tenant from.
pub(crate) const ROW_EVENTS: [(&str, &str); 3] =
    [("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")];

/// SQLite: this migration's trigger after `event` on `table`, reading the tenant from `row`
/// (migration 20 replaces it and puts it back when undone).
pub(crate) fn sqlite_trigger(table: &str, event: &str, row: &str) -> String {
    let kind = event.to_lowercase();
    format!(
        "CREATE TRIGGER {table}_definitions_{kind} AFTER {event} ON {table}
         BEGIN
           UPDATE tenants SET definitions_version = definitions_version + 1
           WHERE id = {row}.tenant_id;
         END;"
    )
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(
            "ALTER TABLE tenants ADD COLUMN definitions_version BIGINT NOT NULL DEFAULT 0",
        )
        .await?;
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(POSTGRES_FUNCTION).await?;
                for table in DEFINITION_TABLES {
                    db.execute_unprepared(&format!(
                        "CREATE TRIGGER {table}_definitions_changed
                           AFTER INSERT OR UPDATE OR DELETE ON {table}
                           FOR EACH ROW EXECUTE FUNCTION cdp_definitions_changed();"
                    ))
                    .await?;
                }
            }
            _ => {
                // SQLite: one trigger per table and kind of change.
                for table in DEFINITION_TABLES {
                    for (event, row) in ROW_EVENTS {
                        db.execute_unprepared(&sqlite_trigger(table, event, row))
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
                for table in DEFINITION_TABLES {
                    db.execute_unprepared(&format!(
                        "DROP TRIGGER IF EXISTS {table}_definitions_changed ON {table}"
                    ))
                    .await?;
                }
                db.execute_unprepared("DROP FUNCTION IF EXISTS cdp_definitions_changed()")
                    .await?;
            }
            _ => {
                for table in DEFINITION_TABLES {
                    for kind in ["insert", "update", "delete"] {
                        db.execute_unprepared(&format!(
                            "DROP TRIGGER IF EXISTS {table}_definitions_{kind}"
                        ))
                        .await?;
                    }
                }
            }
        }
        db.execute_unprepared("ALTER TABLE tenants DROP COLUMN definitions_version")
            .await?;
        Ok(())
    }
}
