//! Campaigns: triggered and broadcast emails. The `campaigns` table holds each campaign's trigger
//! and templates; campaign emails are rows of the existing `email_outbox`, which gains a
//! suppression reason and the unique index that makes one email per (campaign, profile).

use sea_orm_migration::prelude::*;

use crate::m20261128_000001_foundation::{
    plain_index, tenant_fk_to_tenants, tenant_pk, text, text_null, time, unique_index, uuid,
    uuid_null,
};
use crate::tenancy::protect_tenant_table;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000012_campaigns"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // The trigger is one of four kinds; `segment_id`, `stage` and `event` hold its argument.
        // A deleted segment is not a foreign-key error: its campaign simply never fires again.
        manager
            .create_table(
                Table::create()
                    .table("campaigns")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(text("name"))
                    .col(text("status"))
                    .col(text("trigger_kind"))
                    .col(uuid_null("segment_id"))
                    .col(text_null("stage"))
                    .col(text_null("event"))
                    .col(text("subject"))
                    .col(text("text_body"))
                    .col(text_null("html_body"))
                    .col(text("consent_purpose"))
                    .col(time("created_at"))
                    .col(time("updated_at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("campaigns"))
                    .to_owned(),
            )
            .await?;
        // The write path looks up the tenant's active campaigns on every batch.
        plain_index(
            manager,
            "campaigns",
            "ix_campaigns_status",
            &["tenant_id", "status"],
        )
        .await?;
        protect_tenant_table(manager, "campaigns").await?;

        manager
            .alter_table(
                Table::alter()
                    .table("email_outbox")
                    .add_column(text_null("suppression_reason"))
                    .to_owned(),
            )
            .await?;
        // One email per (campaign, profile). Account emails have no campaign: NULLs are distinct
        // in a unique index on both databases, so they never conflict.
        unique_index(
            manager,
            "email_outbox",
            "ux_email_outbox_campaign_profile",
            &["tenant_id", "campaign_id", "profile_id"],
        )
        .await?;
        // The frequency cap counts a profile's campaign emails of the last day.
        plain_index(
            manager,
            "email_outbox",
            "ix_email_outbox_profile_time",
            &["tenant_id", "profile_id", "created_at"],
        )
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ix_email_outbox_profile_time")
                    .table("email_outbox")
                    .to_owned(),
            )
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("ux_email_outbox_campaign_profile")
                    .table("email_outbox")
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table("email_outbox")
                    .drop_column("suppression_reason")
                    .to_owned(),
            )
            .await?;
        manager
            .drop_table(Table::drop().table("campaigns").if_exists().to_owned())
            .await
    }
}
