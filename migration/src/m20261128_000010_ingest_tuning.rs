//! Ingestion counts without a hot row: every batch appends its per-source counts to
//! `ingest_stat_deltas` instead of incrementing the one `ingest_stats` row of its source and
//! outcome, which every concurrent batch of a source would wait on until the previous one
//! commits. The service folds the deltas into `ingest_stats` from time to time; readers add both.

use sea_orm_migration::prelude::*;

use crate::m20261128_000001_foundation::{tenant_fk_to_tenants, tenant_pk, text, time, uuid};
use crate::tenancy::protect_tenant_table;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000010_ingest_tuning"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One row per batch and outcome; the id is a UUIDv7, so rows are appended in time order.
        manager
            .create_table(
                Table::create()
                    .table("ingest_stat_deltas")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(uuid("source_id"))
                    .col(text("outcome"))
                    .col(ColumnDef::new("count").big_integer().not_null())
                    .col(time("at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("ingest_stat_deltas"))
                    .to_owned(),
            )
            .await?;
        protect_tenant_table(manager, "ingest_stat_deltas").await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table("ingest_stat_deltas")
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}
