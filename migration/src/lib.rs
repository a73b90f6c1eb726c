//! The database schema of the CDP, owned here and only here: tables, indexes, the service role and
//! row-level security.
//!
//! Guarantees: every tenant table's primary key and unique constraints start with `tenant_id`, and
//! child tables reference their parents by `(tenant_id, id)`. On PostgreSQL every tenant table has
//! row-level security enabled and forced, with the `app.tenant_id` policy (see `docs/adr/0001-tenancy.md`).

pub use sea_orm_migration::prelude::*;

mod m20261128_000001_foundation;
mod m20261128_000002_customer_data;
mod m20261128_000003_understand;
mod m20261128_000010_ingest_tuning;
mod m20261128_000012_campaigns;
mod m20261128_000013_webhooks;
mod m20261128_000014_protect;
mod m20261128_000015_scale;
mod m20261128_000016_replicas;
mod m20261129_000017_user_standing;
mod m20261129_000018_timeline_order;
mod m20261129_000019_definitions_version;
mod m20261130_000020_auth_version;
pub mod partitions;
pub mod tenancy;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_foundation::Migration),
            Box::new(m20261128_000002_customer_data::Migration),
            Box::new(m20261128_000003_understand::Migration),
            Box::new(m20261128_000010_ingest_tuning::Migration),
            Box::new(m20261128_000012_campaigns::Migration),
            Box::new(m20261128_000013_webhooks::Migration),
            Box::new(m20261128_000014_protect::Migration),
            Box::new(m20261128_000015_scale::Migration),
            Box::new(m20261128_000016_replicas::Migration),
            Box::new(m20261129_000017_user_standing::Migration),
            Box::new(m20261129_000018_timeline_order::Migration),
            Box::new(m20261129_000019_definitions_version::Migration),
            Box::new(m20261130_000020_auth_version::Migration),
        ]
    }
}
