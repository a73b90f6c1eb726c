//! Customer data: profiles, identities, events, consents, groups, the merge ledger, per-source
//! ingestion counts, and the channel of each source (api key).

use sea_orm_migration::prelude::*;

use crate::m20261128_000001_foundation::{
    boolean, json, plain_index, tenant_fk, tenant_fk_to_tenants, tenant_pk, text, text_null, time,
    unique_index, uuid, uuid_null,
};
use crate::tenancy::protect_tenant_table;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000002_customer_data"
    }
}

fn big(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).big_integer().not_null().to_owned()
}

pub const TABLES: [&str; 8] = [
    "profiles",
    "identities",
    "events",
    "consents",
    "groups",
    "profile_groups",
    "merge_ledger",
    "ingest_stats",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table("api_keys")
                    .add_column(ColumnDef::new("channel").text().not_null().default("other"))
                    .to_owned(),
            )
            .await?;

        // A profile that was merged away stays as a tombstone whose `merged_into` names the
        // survivor, so that its id keeps resolving.
        manager
            .create_table(
                Table::create()
                    .table("profiles")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(json("traits"))
                    .col(json("trait_clock"))
                    .col(json("channels"))
                    .col(time("first_seen_at"))
                    .col(time("last_seen_at"))
                    .col(big("event_count"))
                    .col(uuid_null("merged_into"))
                    .col(time("created_at"))
                    .col(time("updated_at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("profiles"))
                    .to_owned(),
            )
            .await?;
        plain_index(
            manager,
            "profiles",
            "ix_profiles_merged_into",
            &["tenant_id", "merged_into"],
        )
        .await?;
        plain_index(
            manager,
            "profiles",
            "ix_profiles_last_seen",
            &["tenant_id", "last_seen_at"],
        )
        .await?;

        // One row per identifier: the primary key makes an identifier belong to one profile, and
        // makes concurrent first contacts with the same identifier create one profile.
        manager
            .create_table(
                Table::create()
                    .table("identities")
                    .col(uuid("tenant_id"))
                    .col(text("kind"))
                    .col(text("lookup"))
                    .col(text("value"))
                    .col(uuid("profile_id"))
                    .col(text_null("message_id"))
                    .col(time("created_at"))
                    .primary_key(&mut tenant_pk(&["kind", "lookup"]))
                    .foreign_key(&mut tenant_fk(
                        "identities",
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
            "identities",
            "ix_identities_profile",
            &["tenant_id", "profile_id"],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table("events")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(uuid("profile_id"))
                    .col(text("message_id"))
                    .col(text("type"))
                    .col(text_null("name"))
                    .col(json("properties"))
                    .col(json("context"))
                    .col(time("timestamp"))
                    .col(time("received_at"))
                    .col(uuid_null("source_id"))
                    .col(text("channel"))
                    .col(text_null("user_id"))
                    .col(text_null("anonymous_id"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk(
                        "events",
                        "profile_id",
                        "profiles",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .to_owned(),
            )
            .await?;
        unique_index(
            manager,
            "events",
            "ux_events_message_id",
            &["tenant_id", "message_id"],
        )
        .await?;
        plain_index(
            manager,
            "events",
            "ix_events_profile_time",
            &["tenant_id", "profile_id", "timestamp"],
        )
        .await?;
        plain_index(
            manager,
            "events",
            "ix_events_name_time",
            &["tenant_id", "name", "timestamp"],
        )
        .await?;
        plain_index(
            manager,
            "events",
            "ix_events_time",
            &["tenant_id", "timestamp"],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table("consents")
                    .col(uuid("tenant_id"))
                    .col(uuid("profile_id"))
                    .col(text("purpose"))
                    .col(boolean("granted"))
                    .col(time("updated_at"))
                    .col(text("source"))
                    .primary_key(&mut tenant_pk(&["profile_id", "purpose"]))
                    .foreign_key(&mut tenant_fk(
                        "consents",
                        "profile_id",
                        "profiles",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("groups")
                    .col(uuid("tenant_id"))
                    .col(text("group_id"))
                    .col(json("traits"))
                    .col(json("trait_clock"))
                    .col(time("updated_at"))
                    .primary_key(&mut tenant_pk(&["group_id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("groups"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("profile_groups")
                    .col(uuid("tenant_id"))
                    .col(uuid("profile_id"))
                    .col(text("group_id"))
                    .col(time("joined_at"))
                    .primary_key(&mut tenant_pk(&["profile_id", "group_id"]))
                    .foreign_key(&mut tenant_fk(
                        "profile_groups",
                        "profile_id",
                        "profiles",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .foreign_key(&mut tenant_fk(
                        "profile_groups",
                        "group_id",
                        "groups",
                        "group_id",
                        ForeignKeyAction::Cascade,
                    ))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("merge_ledger")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(time("at"))
                    .col(text("action"))
                    .col(uuid("profile_id"))
                    .col(uuid_null("other_profile_id"))
                    .col(text_null("message_id"))
                    .col(text_null("identity_kind"))
                    .col(text_null("identity_value"))
                    .col(text("rule"))
                    .col(ColumnDef::new("detail").json_binary().null())
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("merge_ledger"))
                    .to_owned(),
            )
            .await?;
        plain_index(
            manager,
            "merge_ledger",
            "ix_merge_ledger_profile",
            &["tenant_id", "profile_id"],
        )
        .await?;
        plain_index(
            manager,
            "merge_ledger",
            "ix_merge_ledger_other",
            &["tenant_id", "other_profile_id"],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table("ingest_stats")
                    .col(uuid("tenant_id"))
                    .col(uuid("source_id"))
                    .col(text("outcome"))
                    .col(big("count"))
                    .col(time("updated_at"))
                    .primary_key(&mut tenant_pk(&["source_id", "outcome"]))
                    .foreign_key(&mut tenant_fk_to_tenants("ingest_stats"))
                    .to_owned(),
            )
            .await?;

        for table in TABLES {
            protect_tenant_table(manager, table).await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in TABLES.iter().rev() {
            manager
                .drop_table(Table::drop().table(*table).if_exists().to_owned())
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table("api_keys")
                    .drop_column("channel")
                    .to_owned(),
            )
            .await
    }
}
