//! Scale: the message-id register that takes over duplicate detection from the events table once
//! that table is partitioned by time (`cdp events partition`, see `crate::partitions` and
//! `docs/adr/0011-event-partitions.md`). PostgreSQL demands that a unique index of a partitioned
//! table hold the partition key, so `(tenant_id, message_id)` can no longer be unique on `events`
//! itself; this small unpartitioned table keeps it unique instead.
//!
//! The table exists on every database so that the schema is one; it stays empty until the events
//! table is partitioned (on SQLite, always).

use sea_orm_migration::prelude::*;

use crate::m20261128_000001_foundation::{
    plain_index, tenant_fk_to_tenants, tenant_pk, text, time, uuid,
};
use crate::tenancy::protect_tenant_table;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000015_scale"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // `timestamp` is the event's, so that the rows of a dropped partition (a range of
        // timestamps) can be told from the others.
        manager
            .create_table(
                Table::create()
                    .table(crate::partitions::MESSAGE_IDS)
                    .col(uuid("tenant_id"))
                    .col(text("message_id"))
                    .col(time("timestamp"))
                    .primary_key(&mut tenant_pk(&["message_id"]))
                    .foreign_key(&mut tenant_fk_to_tenants(crate::partitions::MESSAGE_IDS))
                    .to_owned(),
            )
            .await?;
        // The rows of one tenant in a range of time: what a dropped partition leaves behind.
        plain_index(
            manager,
            crate::partitions::MESSAGE_IDS,
            "ix_event_message_ids_time",
            &["tenant_id", "timestamp"],
        )
        .await?;
        protect_tenant_table(manager, crate::partitions::MESSAGE_IDS).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(crate::partitions::MESSAGE_IDS)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
