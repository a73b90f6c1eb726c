//! Understanding customers: segments with stored membership and its history, lifecycle stages
//! and transitions, computed customer attributes, daily segment sizes.

use sea_orm_migration::prelude::*;

use crate::m20261128_000001_foundation::{
    boolean, int, json, plain_index, tenant_fk, tenant_fk_to_tenants, tenant_pk, text, text_null,
    time, uuid,
};
use crate::tenancy::protect_tenant_table;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000003_understand"
    }
}

pub const TABLES: [&str; 6] = [
    "segments",
    "segment_members",
    "segment_history",
    "segment_snapshots",
    "lifecycle_stages",
    "lifecycle_transitions",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Computed attributes live on the profile row, so that conditions on them are plain
        // column comparisons.
        for column in [
            ColumnDef::new("stage").text().null().to_owned(),
            ColumnDef::new("stage_since")
                .timestamp_with_time_zone()
                .null()
                .to_owned(),
            ColumnDef::new("total_revenue")
                .double()
                .not_null()
                .default(0.0)
                .to_owned(),
            ColumnDef::new("order_count")
                .big_integer()
                .not_null()
                .default(0)
                .to_owned(),
            ColumnDef::new("mean_gap_seconds")
                .double()
                .null()
                .to_owned(),
            ColumnDef::new("rfm_recency").integer().null().to_owned(),
            ColumnDef::new("rfm_frequency").integer().null().to_owned(),
            ColumnDef::new("rfm_monetary").integer().null().to_owned(),
            ColumnDef::new("churn_risk")
                .boolean()
                .not_null()
                .default(false)
                .to_owned(),
        ] {
            let mut column = column;
            manager
                .alter_table(
                    Table::alter()
                        .table("profiles")
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        plain_index(
            manager,
            "profiles",
            "ix_profiles_stage",
            &["tenant_id", "stage"],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table("segments")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(text("name"))
                    .col(text_null("description"))
                    .col(json("condition"))
                    .col(text("status"))
                    .col(ColumnDef::new("size").big_integer().not_null().default(0))
                    .col(boolean("time_dependent"))
                    .col(time("created_at"))
                    .col(time("updated_at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("segments"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("segment_members")
                    .col(uuid("tenant_id"))
                    .col(uuid("segment_id"))
                    .col(uuid("profile_id"))
                    .col(time("since"))
                    .primary_key(&mut tenant_pk(&["segment_id", "profile_id"]))
                    .foreign_key(&mut tenant_fk(
                        "segment_members",
                        "segment_id",
                        "segments",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .foreign_key(&mut tenant_fk(
                        "segment_members",
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
            "segment_members",
            "ix_segment_members_profile",
            &["tenant_id", "profile_id"],
        )
        .await?;
        manager
            .create_table(
                Table::create()
                    .table("segment_history")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(uuid("segment_id"))
                    .col(uuid("profile_id"))
                    .col(boolean("entered"))
                    .col(time("at"))
                    .col(text("reason"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk(
                        "segment_history",
                        "segment_id",
                        "segments",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .to_owned(),
            )
            .await?;
        plain_index(
            manager,
            "segment_history",
            "ix_segment_history_segment",
            &["tenant_id", "segment_id", "at"],
        )
        .await?;
        plain_index(
            manager,
            "segment_history",
            "ix_segment_history_profile",
            &["tenant_id", "profile_id"],
        )
        .await?;
        manager
            .create_table(
                Table::create()
                    .table("segment_snapshots")
                    .col(uuid("tenant_id"))
                    .col(uuid("segment_id"))
                    .col(text("day"))
                    .col(ColumnDef::new("size").big_integer().not_null())
                    .primary_key(&mut tenant_pk(&["segment_id", "day"]))
                    .foreign_key(&mut tenant_fk(
                        "segment_snapshots",
                        "segment_id",
                        "segments",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("lifecycle_stages")
                    .col(uuid("tenant_id"))
                    .col(text("key"))
                    .col(text("name"))
                    .col(json("condition"))
                    .col(int("position"))
                    .primary_key(&mut tenant_pk(&["key"]))
                    .foreign_key(&mut tenant_fk_to_tenants("lifecycle_stages"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("lifecycle_transitions")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(uuid("profile_id"))
                    .col(text_null("from_stage"))
                    .col(text("to_stage"))
                    .col(time("at"))
                    .col(text("reason"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk(
                        "lifecycle_transitions",
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
            "lifecycle_transitions",
            "ix_lifecycle_transitions_profile",
            &["tenant_id", "profile_id", "at"],
        )
        .await?;
        plain_index(
            manager,
            "lifecycle_transitions",
            "ix_lifecycle_transitions_at",
            &["tenant_id", "at"],
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
        Ok(())
    }
}
