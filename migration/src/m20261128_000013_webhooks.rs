//! Webhooks: the endpoints tenants register (`webhooks`) and the durable queue of signed
//! deliveries to them (`webhook_deliveries`), which the webhook worker claims across tenants
//! like the email outbox.
//!
//! A webhook stores no secret: its signing secret is derived from the server's encryption key and
//! the row's `secret_salt` (see `docs/adr/0006-webhooks.md`), so a copy of the database alone
//! cannot sign.

use sea_orm_migration::prelude::*;

use crate::m20261128_000001_foundation::{
    boolean, int, json, plain_index, tenant_fk, tenant_fk_to_tenants, tenant_pk, text, text_null,
    time, time_null, uuid, uuid_null,
};
use crate::tenancy::{allow_system_scan, protect_tenant_table};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000013_webhooks"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table("webhooks")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(text("url"))
                    // A JSON list of topic names ("segment.membership", ...).
                    .col(json("topics"))
                    .col(uuid_null("segment_id"))
                    .col(text_null("event_name"))
                    .col(text("secret_salt"))
                    .col(boolean("active"))
                    .col(time("created_at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("webhooks"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table("webhook_deliveries")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(uuid("webhook_id"))
                    .col(text("topic"))
                    .col(json("payload"))
                    .col(text("status"))
                    .col(int("attempts"))
                    .col(time("next_attempt_at"))
                    .col(time_null("lease_until"))
                    .col(ColumnDef::new("last_status_code").integer().null())
                    .col(text_null("last_error"))
                    // One entry per attempt: {at, statusCode, error}.
                    .col(json("attempt_log"))
                    .col(time("created_at"))
                    .col(time_null("sent_at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("webhook_deliveries"))
                    .foreign_key(&mut tenant_fk(
                        "webhook_deliveries",
                        "webhook_id",
                        "webhooks",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .to_owned(),
            )
            .await?;
        // The worker's claim query: due deliveries of any tenant, oldest first.
        plain_index(
            manager,
            "webhook_deliveries",
            "ix_webhook_deliveries_due",
            &["status", "next_attempt_at"],
        )
        .await?;
        // The delivery log of one webhook, newest first.
        plain_index(
            manager,
            "webhook_deliveries",
            "ix_webhook_deliveries_log",
            &["tenant_id", "webhook_id", "id"],
        )
        .await?;
        protect_tenant_table(manager, "webhooks").await?;
        protect_tenant_table(manager, "webhook_deliveries").await?;
        allow_system_scan(manager, "webhook_deliveries").await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in ["webhook_deliveries", "webhooks"] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
