//! Foundation: tenants, users, roles, api keys, one-time tokens, refresh sessions, audit log and
//! the email outbox.

use sea_orm_migration::prelude::*;

use crate::tenancy::{allow_system_scan, ensure_service_role, grant_table, protect_tenant_table};

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261128_000001_foundation"
    }
}

pub(crate) fn uuid(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).uuid().not_null().to_owned()
}
pub(crate) fn uuid_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).uuid().null().to_owned()
}
pub(crate) fn text(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).text().not_null().to_owned()
}
pub(crate) fn text_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).text().null().to_owned()
}
pub(crate) fn time(name: &'static str) -> ColumnDef {
    ColumnDef::new(name)
        .timestamp_with_time_zone()
        .not_null()
        .to_owned()
}
pub(crate) fn time_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(name)
        .timestamp_with_time_zone()
        .null()
        .to_owned()
}
pub(crate) fn json(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).json_binary().not_null().to_owned()
}
pub(crate) fn json_null(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).json_binary().null().to_owned()
}
pub(crate) fn int(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).integer().not_null().to_owned()
}
pub(crate) fn boolean(name: &'static str) -> ColumnDef {
    ColumnDef::new(name).boolean().not_null().to_owned()
}

/// `PRIMARY KEY (tenant_id, <cols>...)`.
pub(crate) fn tenant_pk(cols: &[&'static str]) -> IndexCreateStatement {
    let mut index = Index::create();
    index.col("tenant_id");
    for col in cols {
        index.col(*col);
    }
    index.to_owned()
}

/// A foreign key from `(tenant_id, from)` to `(tenant_id, to)` of `table`.
pub(crate) fn tenant_fk(
    from_table: &'static str,
    from: &'static str,
    table: &'static str,
    to: &'static str,
    on_delete: ForeignKeyAction,
) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(format!("fk_{from_table}_{from}"))
        .from_tbl(from_table)
        .from_col("tenant_id")
        .from_col(from)
        .to_tbl(table)
        .to_col("tenant_id")
        .to_col(to)
        .on_delete(on_delete)
        .to_owned()
}

pub(crate) fn tenant_fk_to_tenants(from_table: &'static str) -> ForeignKeyCreateStatement {
    ForeignKey::create()
        .name(format!("fk_{from_table}_tenant"))
        .from_tbl(from_table)
        .from_col("tenant_id")
        .to_tbl("tenants")
        .to_col("id")
        .on_delete(ForeignKeyAction::Cascade)
        .to_owned()
}

pub(crate) async fn unique_index(
    manager: &SchemaManager<'_>,
    table: &'static str,
    name: &'static str,
    cols: &[&'static str],
) -> Result<(), DbErr> {
    let mut index = Index::create();
    index.name(name).table(table).unique();
    for col in cols {
        index.col(*col);
    }
    manager.create_index(index.to_owned()).await
}

pub(crate) async fn plain_index(
    manager: &SchemaManager<'_>,
    table: &'static str,
    name: &'static str,
    cols: &[&'static str],
) -> Result<(), DbErr> {
    let mut index = Index::create();
    index.name(name).table(table);
    for col in cols {
        index.col(*col);
    }
    manager.create_index(index.to_owned()).await
}

pub const TENANT_TABLES: [&str; 8] = [
    "users",
    "roles",
    "user_roles",
    "api_keys",
    "one_time_tokens",
    "refresh_sessions",
    "audit_log",
    "email_outbox",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        ensure_service_role(manager).await?;

        // The tenant registry: a slug and a name, no customer data. It has no row-level security
        // because a login names its tenant by slug before any tenant is known; on Citus it is a
        // reference table.
        manager
            .create_table(
                Table::create()
                    .table("tenants")
                    .col(uuid("id").primary_key())
                    .col(text("slug"))
                    .col(text("name"))
                    .col(json("settings"))
                    .col(time("created_at"))
                    .to_owned(),
            )
            .await?;
        unique_index(manager, "tenants", "ux_tenants_slug", &["slug"]).await?;
        grant_table(manager, "tenants").await?;

        manager
            .create_table(
                Table::create()
                    .table("users")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(text("email"))
                    .col(text_null("password_hash"))
                    .col(text("status"))
                    .col(time("created_at"))
                    .col(time("updated_at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("users"))
                    .to_owned(),
            )
            .await?;
        unique_index(manager, "users", "ux_users_email", &["tenant_id", "email"]).await?;

        manager
            .create_table(
                Table::create()
                    .table("roles")
                    .col(uuid("tenant_id"))
                    .col(text("name"))
                    .col(json("permissions"))
                    .col(boolean("built_in"))
                    .col(time("created_at"))
                    .primary_key(&mut tenant_pk(&["name"]))
                    .foreign_key(&mut tenant_fk_to_tenants("roles"))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("user_roles")
                    .col(uuid("tenant_id"))
                    .col(uuid("user_id"))
                    .col(text("role_name"))
                    .primary_key(&mut tenant_pk(&["user_id", "role_name"]))
                    .foreign_key(&mut tenant_fk(
                        "user_roles",
                        "user_id",
                        "users",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .foreign_key(&mut tenant_fk(
                        "user_roles",
                        "role_name",
                        "roles",
                        "name",
                        ForeignKeyAction::Restrict,
                    ))
                    .to_owned(),
            )
            .await?;
        plain_index(
            manager,
            "user_roles",
            "ix_user_roles_role",
            &["tenant_id", "role_name"],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table("api_keys")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(text("name"))
                    .col(text("scope"))
                    .col(text("prefix"))
                    .col(text("key_hash"))
                    .col(uuid_null("created_by"))
                    .col(time("created_at"))
                    .col(time_null("revoked_at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("api_keys"))
                    .to_owned(),
            )
            .await?;
        unique_index(
            manager,
            "api_keys",
            "ux_api_keys_hash",
            &["tenant_id", "key_hash"],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table("one_time_tokens")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(uuid("user_id"))
                    .col(text("purpose"))
                    .col(text("token_hash"))
                    .col(time("created_at"))
                    .col(time("expires_at"))
                    .col(time_null("used_at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk(
                        "one_time_tokens",
                        "user_id",
                        "users",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .to_owned(),
            )
            .await?;
        unique_index(
            manager,
            "one_time_tokens",
            "ux_one_time_tokens_hash",
            &["tenant_id", "token_hash"],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table("refresh_sessions")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(uuid("family_id"))
                    .col(uuid("user_id"))
                    .col(text("token_hash"))
                    .col(time("created_at"))
                    .col(time("expires_at"))
                    .col(time_null("used_at"))
                    .col(time_null("revoked_at"))
                    .col(text_null("ip"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk(
                        "refresh_sessions",
                        "user_id",
                        "users",
                        "id",
                        ForeignKeyAction::Cascade,
                    ))
                    .to_owned(),
            )
            .await?;
        unique_index(
            manager,
            "refresh_sessions",
            "ux_refresh_sessions_hash",
            &["tenant_id", "token_hash"],
        )
        .await?;
        plain_index(
            manager,
            "refresh_sessions",
            "ix_refresh_sessions_family",
            &["tenant_id", "family_id"],
        )
        .await?;
        plain_index(
            manager,
            "refresh_sessions",
            "ix_refresh_sessions_user",
            &["tenant_id", "user_id"],
        )
        .await?;

        manager
            .create_table(
                Table::create()
                    .table("audit_log")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(time("at"))
                    .col(text("actor"))
                    .col(text("action"))
                    .col(text_null("target"))
                    .col(json_null("detail"))
                    .col(text_null("ip"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("audit_log"))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table("email_outbox")
                    .col(uuid("tenant_id"))
                    .col(uuid("id"))
                    .col(text("message_id"))
                    .col(text("kind"))
                    .col(text("to_address"))
                    .col(text("subject"))
                    .col(text("text_body"))
                    .col(text_null("html_body"))
                    .col(json("headers"))
                    .col(text("status"))
                    .col(int("attempts"))
                    .col(int("max_attempts"))
                    .col(time("next_attempt_at"))
                    .col(time_null("claimed_until"))
                    .col(text_null("last_error"))
                    .col(time_null("sent_at"))
                    .col(uuid_null("campaign_id"))
                    .col(uuid_null("profile_id"))
                    .col(time("created_at"))
                    .primary_key(&mut tenant_pk(&["id"]))
                    .foreign_key(&mut tenant_fk_to_tenants("email_outbox"))
                    .to_owned(),
            )
            .await?;
        unique_index(
            manager,
            "email_outbox",
            "ux_email_outbox_message_id",
            &["tenant_id", "message_id"],
        )
        .await?;
        // The worker's claim query: due emails of any tenant, oldest first.
        plain_index(
            manager,
            "email_outbox",
            "ix_email_outbox_due",
            &["status", "next_attempt_at"],
        )
        .await?;

        for table in TENANT_TABLES {
            protect_tenant_table(manager, table).await?;
        }
        allow_system_scan(manager, "email_outbox").await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in TENANT_TABLES.iter().rev().chain(["tenants"].iter()) {
            manager
                .drop_table(Table::drop().table(*table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}
