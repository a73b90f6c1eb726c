//! The operator's account commands: `cdp tenant`, `cdp user` and `cdp apikey`.
//!
//! Each command calls the same use case as the GraphQL API (`service::accounts`), acting as the
//! operator (`accounts::Operator`): the same checks, the same transaction, the same email through
//! the outbox and the same audit entry, with the actor `operator:NAME`. Nothing here writes a
//! table. Listings print a table, or JSON with `--json`; an error is returned (and `cdp` exits
//! non-zero) for an unknown tenant, user, role or key and for any input the use case refuses.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::service::accounts::{self, ApiKey, ApiKeyScope, Operator, TenantOverview, User};
use crate::service::{AppState, RequestMeta, ServiceError};
use crate::store;

/// The account commands, flattened into `cdp`'s own.
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Manage tenants: create, list, show.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Manage a tenant's users: list, invite, set roles, disable, enable.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage a tenant's api keys (sources): list, create, revoke.
    Apikey {
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and its owner (pending); queues the owner's activation email and prints
    /// the activation link.
    Create {
        /// The tenant's slug (lower-case letters, digits and dashes), used to sign in.
        #[arg(long)]
        slug: String,
        /// The tenant's display name.
        #[arg(long)]
        name: String,
        /// The owner's email address.
        #[arg(long = "owner-email")]
        owner_email: String,
    },
    /// List every tenant: slug, name, id, creation time, users and live profiles.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one tenant: slug, name, id, creation time, users and live profiles.
    Show {
        /// The tenant's slug.
        slug: String,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// List a tenant's users: email, status, roles, creation time.
    List {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Invite a user with roles, as the GraphQL inviteUser does: the user is pending and is
    /// emailed an activation link (through the outbox); the link is printed too.
    Invite {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// The user's email address.
        #[arg(long)]
        email: String,
        /// A role to grant (repeat for several): a built-in role (owner, admin, marketer,
        /// analyst, viewer) or one of the tenant's custom roles.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
    },
    /// Replace a user's roles with the given ones; the tenant keeps at least one active owner.
    SetRoles {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// The user's email address.
        #[arg(long)]
        email: String,
        /// A role the user will hold (repeat for several).
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
    },
    /// Deactivate a user, as the GraphQL deactivateUser does: they cannot sign in, their
    /// sessions are revoked and their unused links retired.
    Disable {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// The user's email address.
        #[arg(long)]
        email: String,
    },
    /// Let a deactivated user back in: with a password they sign in again; one who never
    /// activated is pending again and is emailed a new activation link (printed too).
    Enable {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// The user's email address.
        #[arg(long)]
        email: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// List a tenant's api keys: id, name, scope, channel, visible prefix, creation and
    /// revocation times (never the secret).
    List {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create an api key and print its secret, once: it is stored only as a hash.
    Create {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// A name to recognize the key by.
        #[arg(long)]
        name: String,
        /// WRITE sends data only (the collection API); SECRET acts as an admin without account
        /// management.
        #[arg(long, value_enum, ignore_case = true)]
        scope: ScopeArg,
        /// The channel this source sends from.
        #[arg(long, value_enum, ignore_case = true, default_value = "other")]
        channel: ChannelArg,
        /// Print a JSON object (with the secret) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an api key, named by its id or by its name (which must name one unrevoked key);
    /// the collection API refuses it with 401 from then on.
    Revoke {
        /// The tenant's slug.
        #[arg(long)]
        tenant: String,
        /// The key's id, or its name.
        key: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ScopeArg {
    Write,
    Secret,
}

impl From<ScopeArg> for ApiKeyScope {
    fn from(scope: ScopeArg) -> Self {
        match scope {
            ScopeArg::Write => ApiKeyScope::Write,
            ScopeArg::Secret => ApiKeyScope::Secret,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ChannelArg {
    Web,
    Mobile,
    Server,
    Email,
    Social,
    Other,
}

impl From<ChannelArg> for domain::ingest::Channel {
    fn from(channel: ChannelArg) -> Self {
        use domain::ingest::Channel as C;
        match channel {
            ChannelArg::Web => C::Web,
            ChannelArg::Mobile => C::Mobile,
            ChannelArg::Server => C::Server,
            ChannelArg::Email => C::Email,
            ChannelArg::Social => C::Social,
            ChannelArg::Other => C::Other,
        }
    }
}

/// Who runs a command and how.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The operator's name in the audit log (`operator:NAME`).
    pub operator: String,
    /// Whether to draw progress bars on standard error.
    pub show_progress: bool,
}

impl Invocation {
    /// The operator is the login name of the shell (`USER`), or `cli`; progress bars are drawn
    /// when standard error is a terminal.
    pub fn from_env() -> Invocation {
        Invocation {
            operator: operator_name(),
            show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }
}

/// The operator's name for the audit log: the login name of the shell, or `cli`.
pub fn operator_name() -> String {
    std::env::var("USER")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| "cli".to_owned())
}

#[derive(Debug, Parser)]
#[command(name = "cdp", no_binary_name = true)]
struct AccountCli {
    #[command(subcommand)]
    command: AccountCommand,
}

/// Parses account command arguments (without the program name, e.g. `["user", "list",
/// "--tenant", "acme"]`) as `cdp` does and runs them, writing to `out`. For tests and tools that
/// drive the command line in process.
pub async fn run_args(
    state: &AppState,
    invocation: &Invocation,
    args: &[&str],
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let cli = AccountCli::try_parse_from(args).map_err(|error| anyhow::anyhow!("{error}"))?;
    run(state, invocation, cli.command, out).await
}

/// Runs one account command, writing what it prints to `out`.
pub async fn run(
    state: &AppState,
    invocation: &Invocation,
    command: AccountCommand,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match command {
        AccountCommand::Tenant { command } => tenant(state, invocation, command, out).await,
        AccountCommand::User { command } => user(state, invocation, command, out).await,
        AccountCommand::Apikey { command } => api_key(state, invocation, command, out).await,
    }
}

/// A use case's error as the operator reads it.
fn refused(error: ServiceError) -> anyhow::Error {
    anyhow::anyhow!("{error}")
}

/// The operator acting in the tenant with this slug.
async fn operator_in(
    state: &AppState,
    invocation: &Invocation,
    slug: &str,
) -> anyhow::Result<Operator> {
    let tenant = store::tenants::find_by_slug(&state.store, slug.trim())
        .await?
        .with_context(|| format!("there is no tenant with the slug {slug:?}"))?;
    Ok(Operator {
        tenant_id: domain::TenantId(tenant.id),
        name: invocation.operator.clone(),
    })
}

/// The user with this email in the operator's tenant.
async fn user_named(state: &AppState, operator: &Operator, email: &str) -> anyhow::Result<User> {
    accounts::user_by_email_as(state, operator, email)
        .await
        .map_err(|error| match error {
            ServiceError::NotFound(_) => {
                anyhow::anyhow!("there is no user with the email {email:?} in this tenant")
            }
            other => refused(other),
        })
}

fn time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Writes rows as a table: columns padded to their widest cell, two spaces apart.
fn table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|cell| cell.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: Vec<&str>| -> std::io::Result<()> {
        let mut text = String::new();
        for (index, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if index + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  "));
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(header.to_vec())?;
    for row in rows {
        line(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

fn tenant_json(overview: &TenantOverview) -> Value {
    json!({
        "slug": overview.tenant.slug,
        "name": overview.tenant.name,
        "id": overview.tenant.id.to_string(),
        "createdAt": time(overview.tenant.created_at),
        "users": overview.users,
        "profiles": overview.profiles,
    })
}

fn user_json(user: &User) -> Value {
    json!({
        "id": user.id.to_string(),
        "email": user.email,
        "status": user.status.as_str(),
        "roles": user.roles,
        "createdAt": time(user.created_at),
    })
}

fn api_key_json(key: &ApiKey) -> Value {
    json!({
        "id": key.id.to_string(),
        "name": key.name,
        "scope": scope_name(key.scope),
        "channel": key.channel.as_str().to_uppercase(),
        "prefix": key.prefix,
        "createdAt": time(key.created_at),
        "revokedAt": key.revoked_at.map(time),
    })
}

fn scope_name(scope: ApiKeyScope) -> &'static str {
    match scope {
        ApiKeyScope::Write => "WRITE",
        ApiKeyScope::Secret => "SECRET",
    }
}

async fn tenant(
    state: &AppState,
    invocation: &Invocation,
    command: TenantCommand,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match command {
        TenantCommand::Create {
            slug,
            name,
            owner_email,
        } => {
            let (tenant, user, token) = accounts::sign_up(
                state,
                &RequestMeta::default(),
                accounts::SignUpCommand {
                    tenant_name: name,
                    tenant_slug: slug,
                    email: owner_email,
                },
            )
            .await
            .map_err(refused)
            .context("cannot create the tenant")?;
            writeln!(
                out,
                "tenant {} ({}) created; owner {} is pending",
                tenant.slug, tenant.id, user.email
            )?;
            writeln!(
                out,
                "activation link: {}/activate?token={token}",
                state.config.public_url
            )?;
        }
        TenantCommand::List { json } => {
            let overviews = tenants_with_progress(state, invocation.show_progress).await?;
            if json {
                let list: Vec<Value> = overviews.iter().map(tenant_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let rows: Vec<Vec<String>> = overviews
                    .iter()
                    .map(|overview| {
                        vec![
                            overview.tenant.slug.clone(),
                            overview.tenant.name.clone(),
                            overview.tenant.id.to_string(),
                            time(overview.tenant.created_at),
                            overview.users.to_string(),
                            overview.profiles.to_string(),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &["SLUG", "NAME", "ID", "CREATED", "USERS", "PROFILES"],
                    &rows,
                )?;
            }
        }
        TenantCommand::Show { slug, json } => {
            let overview = accounts::tenant_overview(state, &slug)
                .await
                .map_err(|error| match error {
                    ServiceError::NotFound(_) => {
                        anyhow::anyhow!("there is no tenant with the slug {slug:?}")
                    }
                    other => refused(other),
                })?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&tenant_json(&overview))?
                )?;
            } else {
                writeln!(out, "slug:     {}", overview.tenant.slug)?;
                writeln!(out, "name:     {}", overview.tenant.name)?;
                writeln!(out, "id:       {}", overview.tenant.id)?;
                writeln!(out, "created:  {}", time(overview.tenant.created_at))?;
                writeln!(out, "users:    {}", overview.users)?;
                writeln!(out, "profiles: {}", overview.profiles)?;
            }
        }
    }
    Ok(())
}

/// Every tenant with its counts, with a progress bar (each tenant is counted in its own read).
async fn tenants_with_progress(
    state: &AppState,
    show_progress: bool,
) -> anyhow::Result<Vec<TenantOverview>> {
    let slugs: Vec<String> = store::tenants::list(&state.store)
        .await?
        .into_iter()
        .map(|row| row.slug)
        .collect();
    let bar = if show_progress {
        let bar = ProgressBar::new(slugs.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} tenants ({eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut overviews = Vec::with_capacity(slugs.len());
    for slug in slugs {
        match accounts::tenant_overview(state, &slug).await {
            Ok(overview) => overviews.push(overview),
            // Deleted between the listing and its count: nothing to show.
            Err(ServiceError::NotFound(_)) => {}
            Err(error) => {
                bar.finish_and_clear();
                return Err(refused(error));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(overviews)
}

async fn user(
    state: &AppState,
    invocation: &Invocation,
    command: UserCommand,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let meta = RequestMeta::default();
    match command {
        UserCommand::List { tenant, json } => {
            let operator = operator_in(state, invocation, &tenant).await?;
            let mut users = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page = accounts::users_as(state, &operator, Some(100), after.as_deref())
                    .await
                    .map_err(refused)?;
                let next = page.end_cursor().filter(|_| page.has_next_page);
                users.extend(page.items.into_iter().map(|(user, _cursor)| user));
                match next {
                    Some(cursor) => after = Some(cursor),
                    None => break,
                }
            }
            if json {
                let list: Vec<Value> = users.iter().map(user_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let rows: Vec<Vec<String>> = users
                    .iter()
                    .map(|user| {
                        vec![
                            user.email.clone(),
                            user.status.as_str().to_owned(),
                            user.roles.join(","),
                            time(user.created_at),
                            user.id.to_string(),
                        ]
                    })
                    .collect();
                table(out, &["EMAIL", "STATUS", "ROLES", "CREATED", "ID"], &rows)?;
            }
        }
        UserCommand::Invite {
            tenant,
            email,
            roles,
        } => {
            let operator = operator_in(state, invocation, &tenant).await?;
            let (user, token) = accounts::invite_user_as(state, &operator, &meta, &email, &roles)
                .await
                .map_err(refused)
                .with_context(|| format!("cannot invite {email}"))?;
            writeln!(
                out,
                "user {} ({}) invited with roles {}; the activation email is queued",
                user.email,
                user.id,
                user.roles.join(",")
            )?;
            writeln!(
                out,
                "activation link: {}/activate?token={token}",
                state.config.public_url
            )?;
        }
        UserCommand::SetRoles {
            tenant,
            email,
            roles,
        } => {
            let operator = operator_in(state, invocation, &tenant).await?;
            let user = user_named(state, &operator, &email).await?;
            let user = accounts::set_user_roles_as(state, &operator, &meta, user.id, &roles)
                .await
                .map_err(refused)
                .with_context(|| format!("cannot set the roles of {email}"))?;
            writeln!(
                out,
                "user {} now holds {}",
                user.email,
                user.roles.join(",")
            )?;
        }
        UserCommand::Disable { tenant, email } => {
            let operator = operator_in(state, invocation, &tenant).await?;
            let user = user_named(state, &operator, &email).await?;
            let user = accounts::deactivate_user_as(state, &operator, &meta, user.id)
                .await
                .map_err(refused)
                .with_context(|| format!("cannot disable {email}"))?;
            writeln!(
                out,
                "user {} is deactivated; their sessions are revoked",
                user.email
            )?;
        }
        UserCommand::Enable { tenant, email } => {
            let operator = operator_in(state, invocation, &tenant).await?;
            let user = user_named(state, &operator, &email).await?;
            let reactivation = accounts::reactivate_user_as(state, &operator, &meta, user.id)
                .await
                .map_err(refused)
                .with_context(|| format!("cannot enable {email}"))?;
            writeln!(
                out,
                "user {} is {}",
                reactivation.user.email,
                reactivation.user.status.as_str()
            )?;
            if let Some(token) = reactivation.activation_token {
                writeln!(
                    out,
                    "they never activated: a new activation email is queued; activation link: {}/activate?token={token}",
                    state.config.public_url
                )?;
            }
        }
    }
    Ok(())
}

async fn api_key(
    state: &AppState,
    invocation: &Invocation,
    command: ApiKeyCommand,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let meta = RequestMeta::default();
    match command {
        ApiKeyCommand::List { tenant, json } => {
            let operator = operator_in(state, invocation, &tenant).await?;
            let keys = accounts::api_keys_as(state, &operator)
                .await
                .map_err(refused)?;
            if json {
                let list: Vec<Value> = keys.iter().map(api_key_json).collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let rows: Vec<Vec<String>> = keys
                    .iter()
                    .map(|key| {
                        vec![
                            key.id.to_string(),
                            key.name.clone(),
                            scope_name(key.scope).to_owned(),
                            key.channel.as_str().to_uppercase(),
                            key.prefix.clone(),
                            time(key.created_at),
                            key.revoked_at.map(time).unwrap_or_else(|| "-".to_owned()),
                        ]
                    })
                    .collect();
                table(
                    out,
                    &[
                        "ID", "NAME", "SCOPE", "CHANNEL", "PREFIX", "CREATED", "REVOKED",
                    ],
                    &rows,
                )?;
            }
        }
        ApiKeyCommand::Create {
            tenant,
            name,
            scope,
            channel,
            json,
        } => {
            let operator = operator_in(state, invocation, &tenant).await?;
            let (key, secret) = accounts::create_api_key_as(
                state,
                &operator,
                &meta,
                &name,
                scope.into(),
                channel.into(),
            )
            .await
            .map_err(refused)
            .context("cannot create the api key")?;
            if json {
                let mut value = api_key_json(&key);
                value["secret"] = Value::String(secret);
                writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                writeln!(
                    out,
                    "api key {} ({}, {} {}) created; its secret, shown this once:",
                    key.name,
                    key.id,
                    scope_name(key.scope),
                    key.channel.as_str().to_uppercase()
                )?;
                writeln!(out, "{secret}")?;
            }
        }
        ApiKeyCommand::Revoke { tenant, key } => {
            let operator = operator_in(state, invocation, &tenant).await?;
            let keys = accounts::api_keys_as(state, &operator)
                .await
                .map_err(refused)?;
            let wanted = key.trim();
            let by_id = uuid::Uuid::parse_str(wanted)
                .ok()
                .and_then(|id| keys.iter().find(|candidate| candidate.id.as_uuid() == id));
            let chosen = match by_id {
                Some(found) => found,
                None => {
                    let named: Vec<&ApiKey> = keys
                        .iter()
                        .filter(|candidate| {
                            candidate.name == wanted && candidate.revoked_at.is_none()
                        })
                        .collect();
                    match named.as_slice() {
                        [one] => *one,
                        [] => anyhow::bail!(
                            "there is no unrevoked api key with the id or name {wanted:?} in this tenant"
                        ),
                        several => anyhow::bail!(
                            "{} unrevoked api keys are named {wanted:?}; revoke one by its id: {}",
                            several.len(),
                            several
                                .iter()
                                .map(|candidate| candidate.id.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    }
                }
            };
            let revoked = accounts::revoke_api_key_as(state, &operator, &meta, chosen.id)
                .await
                .map_err(refused)
                .context("cannot revoke the api key")?;
            writeln!(
                out,
                "api key {} ({}) revoked at {}",
                revoked.name,
                revoked.id,
                revoked.revoked_at.map(time).unwrap_or_default()
            )?;
        }
    }
    Ok(())
}
