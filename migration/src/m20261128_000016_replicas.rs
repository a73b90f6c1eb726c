//! Several replicas on one database: `scheduler_ticks`, one row per tenant and scheduled job,
//! through which the scheduler loops of every process agree that a tenant's tick runs once per
//! interval (`api::store::scheduler::claim`).
//!
//! A claim is one conditional upsert ("record that I start now, unless someone started less than
//! 90 % of an interval ago"): it needs no advisory lock and means the same on SQLite and
//! PostgreSQL.

use sea_orm_migration::prelude::*;

use crate::m20261128_000001_foundation::{tenant_fk_to_tenants, tenant_pk, text, time, uuid};
use crate::tenancy::protect_tenant_table;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000016_replicas"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("scheduler_ticks")
                    .col(uuid("tenant_id"))
                    // The scheduled job ("tick": the whole scheduler tick of the tenant).
                    .col(text("job"))
                    // When the last claimed run started, by the claiming process's clock.
                    .col(time("started_at"))
                    // The process that claimed it (its store's origin id), for operators.
                    .col(text("holder"))
                    // How many runs were claimed, ever: tells operators (and the replica test)
                    // how often the job ran, whatever the number of processes.
                    .col(ColumnDef::new("runs").big_integer().not_null())
                    .primary_key(&mut tenant_pk(&["job"]))
                    .foreign_key(&mut tenant_fk_to_tenants("scheduler_ticks"))
                    .to_owned(),
            )
            .await?;
        protect_tenant_table(manager, "scheduler_ticks").await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table("scheduler_ticks")
                    .if_exists()
                    .to_owned(),
            )
            .await?;
        Ok(())
    }
}
