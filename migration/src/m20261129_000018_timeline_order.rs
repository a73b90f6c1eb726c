//! The timeline index in the timeline's own order: `(tenant_id, profile_id, timestamp, id)`
//! instead of `(tenant_id, profile_id, timestamp)`.
//!
//! A profile's events are read newest first by `(timestamp, id)` (`Profile.events`, `events`,
//! cursor pages, the newest events of a page of profiles). Without `id` in the index, SQLite sorted
//! every page in a temporary b-tree ("USE TEMP B-TREE FOR RIGHT PART OF ORDER BY": a b-tree and its
//! page cache allocated per execution) and PostgreSQL ran an incremental sort; with it, both walk
//! the index backwards and stop at the limit. Every use of the old index (equality on the profile,
//! a range on the timestamp) is served by the new one, so the table keeps the same number of
//! indexes.
//!
//! On a partitioned events table (`cdp events partition`) PostgreSQL creates the index on every
//! partition and drops the old one from every partition. The statement locks the table for
//! writes while it builds; a large deployment may create the index `CONCURRENTLY` beforehand
//! (unpartitioned tables) under the same name, and this migration then only drops the old one
//! (docs/operations.md, "Upgrades").

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::ConnectionTrait;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261129_000018_timeline_order"
    }
}

const TIMELINE: &str = "CREATE INDEX IF NOT EXISTS \"ix_events_timeline\" \
     ON \"events\" (\"tenant_id\", \"profile_id\", \"timestamp\", \"id\")";
const PROFILE_TIME: &str = "CREATE INDEX IF NOT EXISTS \"ix_events_profile_time\" \
     ON \"events\" (\"tenant_id\", \"profile_id\", \"timestamp\")";

/// Creates one index, then drops the other (by name).
async fn replace(manager: &SchemaManager<'_>, create: &str, drop: &str) -> Result<(), DbErr> {
    let db = manager.get_connection();
    db.execute_unprepared(create).await?;
    db.execute_unprepared(&format!("DROP INDEX IF EXISTS \"{drop}\""))
        .await?;
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        replace(manager, TIMELINE, "ix_events_profile_time").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        replace(manager, PROFILE_TIME, "ix_events_timeline").await
    }
}
