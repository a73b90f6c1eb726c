//! Protection of personal data (see `docs/adr/0007-pii-at-rest.md`): the key store
//! (`tenant_keys`, each tenant's key wrapped by the master key; `profile_keys`, each profile's data
//! key wrapped by its tenant's key), the register of erasures and of suppressed identifiers
//! (blind indexes only), the consent history, and the profile a webhook delivery is about, so that
//! erasure can find it.
//!
//! The key tables have no foreign key to `profiles` on purpose: they are the key store, kept apart
//! from the data (a tenant backup never contains them), and deleting a row is what crypto-shreds a
//! profile.

use sea_orm_migration::prelude::*;

use crate::m20261128_000001_foundation::{
    boolean, json_null, plain_index, tenant_fk, tenant_fk_to_tenants, tenant_pk, text, text_null,
    time, time_null, uuid, uuid_null,
};
use crate::tenancy::protect_tenant_table;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000014_protect"
    }
}

pub const TABLES: [&str; 5] = [
    "tenant_keys",
    "profile_keys",
    "erasures",
    "suppressions",
    "consent_history",
];

fn big(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).big_integer().not_null().to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("tenant_keys")
                    .col(uuid("tenant_id"))
                    // Which master key wrapped it (a hash, not the key): rotation rewraps the
                    // rows whose id is not the current key's.
                    .col(text("master_key_id"))
                    .col(text("wrapped"))
                    .col(time("created_at"))
                    .col(time_null("rotated_at"))
                    .primary_key(&mut tenant_pk(&[]))
                    .foreign_key(&mut tenant_fk_to_tenants("tenant_keys"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("profile_keys")
                    .col(uuid("tenant_id"))
                    .col(uuid("profile_id"))
                    .col(text("wrapped"))
                    .col(time("created_at"))
                    .primary_key(&mut tenant_pk(&["profile_id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("profile_keys"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("erasures")
                    .col(uuid("tenant_id"))
                    .col(uuid("profile_id"))
                    .col(time("erased_at"))
                    .col(text("actor"))
                    .col(big("events_deleted"))
                    .col(big("identities_deleted"))
                    .col(boolean("suppressed"))
                    .primary_key(&mut tenant_pk(&["profile_id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("erasures"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("suppressions")
                    .col(uuid("tenant_id"))
                    .col(text("kind"))
                    // The identifier's blind index, never its value.
                    .col(text("lookup"))
                    .col(time("created_at"))
                    .primary_key(&mut tenant_pk(&["kind", "lookup"]))
                    .foreign_key(&mut tenant_fk_to_tenants("suppressions"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("consent_history")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(uuid("profile_id"))
                    .col(text("purpose"))
                    .col(boolean("granted"))
                    // What changed it: a source ("api", "unsubscribe", "context", ...).
                    .col(text("source"))
                    // Who: a user or api key, when a principal did it.
                    .col(text_null("actor"))
                    .col(text_null("message_id"))
                    .col(time("at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk(
                        "consent_history",
                        "profile_id",
                        "profiles",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .to_owned(),
            )
            .await?;
        plain_index(
            manager,
            "consent_history",
            "ix_consent_history_profile",
            &["tenant_id", "profile_id", "at"],
        )
        .await?;
        manager
            .alter_table(
                Table::alter()
                    .table("webhook_deliveries")
                    .add_column(uuid_null("profile_id"))
                    .to_owned(),
            )
            .await?;
        plain_index(
            manager,
            "webhook_deliveries",
            "ix_webhook_deliveries_profile",
            &["tenant_id", "profile_id"],
        )
        .await?;
        // The form of a condition that is evaluated: personal values compared through their blind
        // index (`domain::pii::blind_condition`); `condition` keeps the definition as written.
        for table in ["segments", "lifecycle_stages"] {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .add_column(json_null("evaluated"))
                        .to_owned(),
                )
                .await?;
        }
        for table in TABLES {
            protect_tenant_table(manager, table).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in ["segments", "lifecycle_stages"] {
            manager
                .alter_table(
                    Table::alter()
                        .table(table)
                        .drop_column("evaluated")
                        .to_owned(),
                )
                .await?;
        }
        manager
            .drop_index(
                Index::drop()
                    .name("ix_webhook_deliveries_profile")
                    .table("webhook_deliveries")
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table("webhook_deliveries")
                    .drop_column("profile_id")
                    .to_owned(),
            )
            .await?;
        for table in TABLES.iter().rev() {
            manager
                .drop_table(Table::drop().table(*table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
