//! Accounts: tenants, users, roles, sessions and api keys.

use std::collections::BTreeSet;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use domain::{
    ApiKeyId, BuiltInRole, Email, Password, Permission, RoleName, TenantId, TenantName, TenantSlug,
    UserId, UserStatus,
};
use serde_json::json;
use uuid::Uuid;

use super::audit;
use super::auth::{permissions_of_user, require, require_permission};
use super::emails;
use super::pagination::{build_page, decode_cursor, page_size, Page};
use super::{AppState, RequestMeta, ServiceError, ServiceResult};
use crate::auth::secrets::{
    self, ACTIVATION_PREFIX, REFRESH_PREFIX, RESET_PREFIX, SECRET_KEY_PREFIX, WRITE_KEY_PREFIX,
};
use crate::auth::{Principal, PrincipalKind};
use crate::store::{self, TenantTx};

const PURPOSE_ACTIVATION: &str = "activation";
const PURPOSE_RESET: &str = "password_reset";

#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: TenantId,
    pub slug: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: UserId,
    pub email: String,
    pub status: UserStatus,
    pub roles: Vec<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Role {
    pub name: String,
    pub permissions: Vec<Permission>,
    pub built_in: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKeyScope {
    Write,
    Secret,
}

impl ApiKeyScope {
    fn as_str(self) -> &'static str {
        match self {
            ApiKeyScope::Write => "WRITE",
            ApiKeyScope::Secret => "SECRET",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: ApiKeyId,
    pub name: String,
    pub scope: ApiKeyScope,
    /// The channel this source sends from.
    pub channel: domain::ingest::Channel,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A signed-in session: a short-lived access token and a rotating refresh token.
#[derive(Debug, Clone)]
pub struct Session {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_at: DateTime<Utc>,
    pub user: User,
}

/// What `me` answers.
#[derive(Debug, Clone)]
pub struct Me {
    pub user: Option<User>,
    pub api_key: Option<ApiKey>,
    pub tenant: Tenant,
    pub permissions: Vec<Permission>,
}

/// The operator at the command line (`cdp user …`, `cdp apikey …`), acting in one tenant with
/// every right of an owner. The audit log names them `operator:NAME`.
#[derive(Debug, Clone)]
pub struct Operator {
    pub tenant_id: TenantId,
    /// Who runs the command (the login name of the shell, or `cli`).
    pub name: String,
}

impl Operator {
    fn actor(&self) -> String {
        format!("operator:{}", self.name)
    }
}

/// Who manages accounts in a use case: a user principal whose permission the caller checked, or
/// the operator at the command line. Both go through the same use case.
#[derive(Clone, Copy)]
enum Manager<'a> {
    User(&'a Principal),
    Operator(&'a Operator),
}

impl Manager<'_> {
    fn tenant_id(&self) -> TenantId {
        match self {
            Manager::User(principal) => principal.tenant_id,
            Manager::Operator(operator) => operator.tenant_id,
        }
    }

    fn actor(&self) -> String {
        match self {
            Manager::User(principal) => principal.actor(),
            Manager::Operator(operator) => operator.actor(),
        }
    }

    fn user_id(&self) -> Option<UserId> {
        match self {
            Manager::User(principal) => principal.user_id(),
            Manager::Operator(_) => None,
        }
    }
}

pub struct SignUpCommand {
    pub tenant_name: String,
    pub tenant_slug: String,
    pub email: String,
}

fn tenant_from_row(row: store::tenants::TenantRow) -> Tenant {
    Tenant {
        id: TenantId(row.id),
        slug: row.slug,
        name: row.name,
        created_at: row.created_at,
    }
}

fn user_from_row(row: store::users::UserRow, roles: Vec<String>) -> User {
    User {
        id: UserId(row.id),
        email: row.email,
        status: row.status.parse().unwrap_or(UserStatus::Deactivated),
        roles,
        created_at: row.created_at,
    }
}

fn role_from_row(row: &store::roles::RoleRow) -> Role {
    Role {
        name: row.name.clone(),
        permissions: store::roles::permission_names(row)
            .iter()
            .filter_map(|name| name.parse().ok())
            .collect(),
        built_in: row.built_in,
    }
}

fn api_key_from_row(row: store::api_keys::ApiKeyRow) -> ApiKey {
    ApiKey {
        id: ApiKeyId(row.id),
        name: row.name,
        scope: if row.scope == "SECRET" {
            ApiKeyScope::Secret
        } else {
            ApiKeyScope::Write
        },
        prefix: row.prefix,
        channel: domain::ingest::Channel::parse(&row.channel),
        created_at: row.created_at,
        revoked_at: row.revoked_at,
    }
}

fn duration(std: std::time::Duration) -> Duration {
    Duration::from_std(std).unwrap_or(Duration::MAX)
}

async fn load_user(tx: &TenantTx, user_id: UserId) -> ServiceResult<User> {
    let row = store::users::get(tx, user_id)
        .await
        .map_err(|error| match error {
            store::StoreError::NotFound => ServiceError::NotFound("user"),
            other => other.into(),
        })?;
    let roles = store::users::roles_of(tx, user_id).await?;
    Ok(user_from_row(row, roles))
}

/// Creates a tenant with its built-in roles and its owner (pending), and queues the activation
/// email, all in one transaction. Returns the activation token for the command line.
#[tracing::instrument(skip_all, fields(slug = %command.tenant_slug))]
pub async fn sign_up(
    state: &AppState,
    meta: &RequestMeta,
    command: SignUpCommand,
) -> ServiceResult<(Tenant, User, String)> {
    let name = TenantName::parse(&command.tenant_name)?;
    let slug = TenantSlug::parse(&command.tenant_slug)?;
    let email = Email::parse(&command.email)?;
    let now = state.now();
    let tenant_id = TenantId(Uuid::now_v7());
    let tx = state.store.begin(tenant_id).await?;
    let tenant = store::tenants::create(&tx, &slug, &name, now).await?;
    // Every tenant gets its key at birth: reads never have to create one.
    state.vault.create_tenant_key(&tx, now).await?;
    for role in BuiltInRole::ALL {
        let permissions: Vec<&str> = role
            .permissions()
            .into_iter()
            .map(Permission::as_str)
            .collect();
        store::roles::insert(&tx, role.name(), &permissions, true, now).await?;
    }
    let user_id = UserId(Uuid::now_v7());
    let user = store::users::insert(&tx, user_id, &email, UserStatus::Pending, now).await?;
    let owner_role = vec![BuiltInRole::Owner.name().to_owned()];
    store::users::set_roles(&tx, user_id, &owner_role).await?;
    let token = issue_one_time_token(state, &tx, user_id, PURPOSE_ACTIVATION, now).await?;
    emails::queue_activation(state, &tx, &email, name.as_str(), &token).await?;
    audit::record(
        state,
        &tx,
        meta,
        &format!("signup <{}>", email.as_str()),
        "tenant.create",
        Some(&format!("tenant:{tenant_id}")),
        Some(json!({"slug": slug.as_str(), "name": name.as_str(), "owner": email.as_str()})),
    )
    .await?;
    tx.commit().await?;
    Ok((
        tenant_from_row(tenant),
        user_from_row(user, owner_role),
        token,
    ))
}

async fn issue_one_time_token(
    state: &AppState,
    tx: &TenantTx,
    user_id: UserId,
    purpose: &str,
    now: DateTime<Utc>,
) -> ServiceResult<String> {
    let (prefix, ttl) = if purpose == PURPOSE_ACTIVATION {
        (ACTIVATION_PREFIX, state.config.activation_token_ttl)
    } else {
        (RESET_PREFIX, state.config.reset_token_ttl)
    };
    store::tokens::retire_unused(tx, user_id, purpose, now).await?;
    let secret = secrets::generate(prefix, tx.tenant_id());
    store::tokens::insert(tx, user_id, purpose, &secret.hash, now, now + duration(ttl)).await?;
    Ok(secret.secret)
}

/// Consumes a one-time token inside `tx`, returning its user. Unknown, used, expired and
/// wrong-purpose tokens all give the same error.
async fn consume_one_time_token(
    tx: &TenantTx,
    token: &str,
    purpose: &str,
    now: DateTime<Utc>,
) -> ServiceResult<UserId> {
    let invalid = || {
        ServiceError::bad_input(
            "token",
            "this link is invalid, used or expired; ask for a new one",
        )
    };
    let row = store::tokens::find_by_hash(tx, &secrets::hash(token))
        .await?
        .ok_or_else(invalid)?;
    if row.purpose != purpose || row.used_at.is_some() || row.expires_at <= now {
        return Err(invalid());
    }
    if !store::tokens::consume(tx, row.id, now).await? {
        return Err(invalid());
    }
    Ok(UserId(row.user_id))
}

fn token_tenant(prefix: &str, token: &str) -> ServiceResult<TenantId> {
    secrets::tenant_of(prefix, token.trim()).ok_or_else(|| {
        ServiceError::bad_input(
            "token",
            "this link is invalid, used or expired; ask for a new one",
        )
    })
}

/// Starts a new session family for a user and returns its tokens.
async fn start_session(
    state: &AppState,
    tx: &TenantTx,
    meta: &RequestMeta,
    user: User,
    family_id: Uuid,
    now: DateTime<Utc>,
) -> ServiceResult<Session> {
    let refresh = secrets::generate(REFRESH_PREFIX, tx.tenant_id());
    store::sessions::insert(
        tx,
        store::sessions::NewSession {
            family_id,
            user_id: user.id,
            token_hash: &refresh.hash,
            expires_at: now + duration(state.config.refresh_token_ttl),
            ip: meta.ip.as_deref(),
        },
        now,
    )
    .await?;
    let expires_at = now + duration(state.config.access_token_ttl);
    let access_token = state
        .jwt
        .issue(user.id, tx.tenant_id(), family_id, now, expires_at)
        .map_err(|error| ServiceError::Unexpected(anyhow::Error::new(error)))?;
    Ok(Session {
        access_token,
        refresh_token: refresh.secret,
        expires_at,
        user,
    })
}

#[tracing::instrument(skip_all)]
pub async fn activate_account(
    state: &AppState,
    meta: &RequestMeta,
    token: &str,
    password: &str,
) -> ServiceResult<Session> {
    let tenant_id = token_tenant(ACTIVATION_PREFIX, token)?;
    let password = Password::parse(password)?;
    let hash = state.hasher.hash(password.expose()).await?;
    let now = state.now();
    let tx = state.store.begin(tenant_id).await?;
    let user_id = consume_one_time_token(&tx, token.trim(), PURPOSE_ACTIVATION, now).await?;
    let user = load_user(&tx, user_id).await?;
    if user.status != UserStatus::Pending {
        return Err(ServiceError::bad_input(
            "token",
            "this account is not waiting for activation",
        ));
    }
    store::users::set_password_hash(&tx, user_id, &hash, now).await?;
    store::users::set_status(&tx, user_id, UserStatus::Active, now).await?;
    let user = User {
        status: UserStatus::Active,
        ..user
    };
    audit::record(
        state,
        &tx,
        meta,
        &format!("user:{user_id} <{}>", user.email),
        "user.activate",
        Some(&format!("user:{user_id}")),
        None,
    )
    .await?;
    let session = start_session(state, &tx, meta, user, Uuid::now_v7(), now).await?;
    tx.commit().await?;
    Ok(session)
}

/// Signs a user in. Unknown tenant, unknown email, wrong password and an inactive account all
/// give the same error after the same work (one password verification).
#[tracing::instrument(skip_all, fields(slug = %tenant_slug))]
pub async fn login(
    state: &AppState,
    meta: &RequestMeta,
    tenant_slug: &str,
    email: &str,
    password: &str,
) -> ServiceResult<Session> {
    let started = Instant::now();
    if let Err(retry_after) = state.login_throttle.check(tenant_slug, email, started) {
        return Err(ServiceError::RateLimited {
            retry_after_secs: retry_after.as_secs().max(1),
        });
    }
    let refused =
        || ServiceError::Unauthenticated("the tenant, email or password is wrong".to_owned());
    let tenant = store::tenants::find_by_slug(&state.store, tenant_slug.trim()).await?;
    let parsed_email = Email::parse(email).ok();
    let candidate = match (&tenant, &parsed_email) {
        (Some(tenant), Some(email)) => {
            let tx = state.store.read(TenantId(tenant.id)).await?;
            store::users::find_by_email(&tx, email).await?
        }
        _ => None,
    };
    let password_ok = state
        .hasher
        .verify(
            candidate
                .as_ref()
                .and_then(|user| user.password_hash.as_deref()),
            password,
        )
        .await?;
    let (Some(tenant), Some(user_row)) = (tenant, candidate) else {
        state
            .login_throttle
            .record_failure(tenant_slug, email, started);
        return Err(refused());
    };
    if !password_ok || user_row.status != UserStatus::Active.as_str() {
        state
            .login_throttle
            .record_failure(tenant_slug, email, started);
        return Err(refused());
    }
    state.login_throttle.record_success(tenant_slug, email);
    let now = state.now();
    let tx = state.store.begin(TenantId(tenant.id)).await?;
    let user = load_user(&tx, UserId(user_row.id)).await?;
    audit::record(
        state,
        &tx,
        meta,
        &format!("user:{} <{}>", user.id, user.email),
        "user.login",
        Some(&format!("user:{}", user.id)),
        None,
    )
    .await?;
    let session = start_session(state, &tx, meta, user, Uuid::now_v7(), now).await?;
    tx.commit().await?;
    Ok(session)
}

/// Rotates a refresh token. A token that was already used revokes its whole family: someone
/// holds a copy.
#[tracing::instrument(skip_all)]
pub async fn refresh_session(
    state: &AppState,
    meta: &RequestMeta,
    refresh_token: &str,
) -> ServiceResult<Session> {
    let refused = || {
        ServiceError::Unauthenticated("the refresh token is invalid, used or expired".to_owned())
    };
    let tenant_id = secrets::tenant_of(REFRESH_PREFIX, refresh_token.trim()).ok_or_else(refused)?;
    let now = state.now();
    let tx = state.store.begin(tenant_id).await?;
    let session = store::sessions::find_by_hash(&tx, &secrets::hash(refresh_token.trim()))
        .await?
        .ok_or_else(refused)?;
    if session.revoked_at.is_some() || session.expires_at <= now {
        return Err(refused());
    }
    if session.used_at.is_some() || !store::sessions::mark_used(&tx, session.id, now).await? {
        store::sessions::revoke_family(&tx, session.family_id, now).await?;
        audit::record(
            state,
            &tx,
            meta,
            &format!("user:{}", session.user_id),
            "session.replay_detected",
            Some(&format!("user:{}", session.user_id)),
            Some(json!({"family": session.family_id})),
        )
        .await?;
        tx.commit().await?;
        return Err(refused());
    }
    let user = load_user(&tx, UserId(session.user_id)).await?;
    if user.status != UserStatus::Active {
        return Err(refused());
    }
    let new_session = start_session(state, &tx, meta, user, session.family_id, now).await?;
    tx.commit().await?;
    Ok(new_session)
}

/// Queues a reset email when the account exists and can sign in; answers the same either way.
#[tracing::instrument(skip_all, fields(slug = %tenant_slug))]
pub async fn request_password_reset(
    state: &AppState,
    meta: &RequestMeta,
    tenant_slug: &str,
    email: &str,
) -> ServiceResult<bool> {
    let (Some(tenant), Ok(email)) = (
        store::tenants::find_by_slug(&state.store, tenant_slug.trim()).await?,
        Email::parse(email),
    ) else {
        return Ok(true);
    };
    let now = state.now();
    let tx = state.store.begin(TenantId(tenant.id)).await?;
    let Some(user) = store::users::find_by_email(&tx, &email).await? else {
        return Ok(true);
    };
    if user.status != UserStatus::Active.as_str() {
        return Ok(true);
    }
    let token = issue_one_time_token(state, &tx, UserId(user.id), PURPOSE_RESET, now).await?;
    emails::queue_password_reset(state, &tx, &email, &tenant.name, &token).await?;
    audit::record(
        state,
        &tx,
        meta,
        &format!("user:{} <{}>", user.id, user.email),
        "user.password_reset_requested",
        Some(&format!("user:{}", user.id)),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Sets a new password with a reset token, revokes every existing session of the user and
/// starts a new one.
#[tracing::instrument(skip_all)]
pub async fn reset_password(
    state: &AppState,
    meta: &RequestMeta,
    token: &str,
    password: &str,
) -> ServiceResult<Session> {
    let tenant_id = token_tenant(RESET_PREFIX, token)?;
    let password = Password::parse(password)?;
    let hash = state.hasher.hash(password.expose()).await?;
    let now = state.now();
    let tx = state.store.begin(tenant_id).await?;
    let user_id = consume_one_time_token(&tx, token.trim(), PURPOSE_RESET, now).await?;
    let user = load_user(&tx, user_id).await?;
    if user.status != UserStatus::Active {
        return Err(ServiceError::bad_input(
            "token",
            "this account cannot sign in",
        ));
    }
    store::users::set_password_hash(&tx, user_id, &hash, now).await?;
    store::sessions::revoke_all_of_user(&tx, user_id, now).await?;
    audit::record(
        state,
        &tx,
        meta,
        &format!("user:{user_id} <{}>", user.email),
        "user.password_reset",
        Some(&format!("user:{user_id}")),
        None,
    )
    .await?;
    let session = start_session(state, &tx, meta, user, Uuid::now_v7(), now).await?;
    tx.commit().await?;
    Ok(session)
}

/// Checks role names against the tenant's roles and the manager's right to grant them: only an
/// owner (or the operator) may grant or take away the owner role.
async fn checked_roles(
    tx: &TenantTx,
    manager: Manager<'_>,
    roles: &[String],
) -> ServiceResult<Vec<String>> {
    let mut names = BTreeSet::new();
    for (index, role) in roles.iter().enumerate() {
        let name = RoleName::parse(role).map_err(|error| {
            ServiceError::bad_input(format!("roles[{index}]"), format!("role {error}"))
        })?;
        if store::roles::find(tx, name.as_str()).await?.is_none() {
            return Err(ServiceError::bad_input(
                format!("roles[{index}]"),
                format!("there is no role named {:?}", name.as_str()),
            ));
        }
        names.insert(name.as_str().to_owned());
    }
    if names.contains(BuiltInRole::Owner.name()) {
        require_owner(tx, manager).await?;
    }
    Ok(names.into_iter().collect())
}

async fn require_owner(tx: &TenantTx, manager: Manager<'_>) -> ServiceResult<()> {
    if let Manager::Operator(_) = manager {
        return Ok(());
    }
    let is_owner = match manager.user_id() {
        Some(user_id) => store::users::roles_of(tx, user_id)
            .await?
            .iter()
            .any(|role| role == BuiltInRole::Owner.name()),
        None => false,
    };
    if !is_owner {
        return Err(ServiceError::Forbidden(
            "only an owner may grant or take away the owner role".to_owned(),
        ));
    }
    Ok(())
}

/// A user principal is needed for account management; api keys never manage accounts.
fn require_account_manager(
    principal: Option<&Principal>,
    permission: Permission,
) -> ServiceResult<&Principal> {
    let principal = require_permission(principal, permission)?;
    if !matches!(principal.kind, PrincipalKind::User { .. }) {
        return Err(ServiceError::Forbidden(
            "api keys cannot manage accounts".to_owned(),
        ));
    }
    Ok(principal)
}

#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn invite_user(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    email: &str,
    roles: &[String],
) -> ServiceResult<User> {
    let principal = require_account_manager(principal, Permission::UsersManage)?;
    let (user, _token) = invite(state, Manager::User(principal), meta, email, roles).await?;
    Ok(user)
}

/// `invite_user` for the operator; also returns the activation token, for the command line to
/// print as `cdp tenant create` does.
#[tracing::instrument(skip_all, fields(tenant_id = %operator.tenant_id))]
pub async fn invite_user_as(
    state: &AppState,
    operator: &Operator,
    meta: &RequestMeta,
    email: &str,
    roles: &[String],
) -> ServiceResult<(User, String)> {
    invite(state, Manager::Operator(operator), meta, email, roles).await
}

/// Creates a pending user with roles and queues the activation email, in one transaction.
async fn invite(
    state: &AppState,
    manager: Manager<'_>,
    meta: &RequestMeta,
    email: &str,
    roles: &[String],
) -> ServiceResult<(User, String)> {
    let email = Email::parse(email)?;
    let now = state.now();
    let tx = state.store.begin(manager.tenant_id()).await?;
    let roles = checked_roles(&tx, manager, roles).await?;
    let user_id = UserId(Uuid::now_v7());
    let row = store::users::insert(&tx, user_id, &email, UserStatus::Pending, now).await?;
    store::users::set_roles(&tx, user_id, &roles).await?;
    let tenant = store::tenants::get(&tx).await?;
    let token = issue_one_time_token(state, &tx, user_id, PURPOSE_ACTIVATION, now).await?;
    emails::queue_activation(state, &tx, &email, &tenant.name, &token).await?;
    audit::record(
        state,
        &tx,
        meta,
        &manager.actor(),
        "user.invite",
        Some(&format!("user:{user_id}")),
        Some(json!({"email": email.as_str(), "roles": roles})),
    )
    .await?;
    tx.commit().await?;
    Ok((user_from_row(row, roles), token))
}

#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn set_user_roles(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    user_id: &str,
    roles: &[String],
) -> ServiceResult<User> {
    let principal = require_account_manager(principal, Permission::UsersManage)?;
    let user_id = parse_id(user_id, "userId", "user").map(UserId)?;
    set_roles(state, Manager::User(principal), meta, user_id, roles).await
}

/// `set_user_roles` for the operator.
#[tracing::instrument(skip_all, fields(tenant_id = %operator.tenant_id))]
pub async fn set_user_roles_as(
    state: &AppState,
    operator: &Operator,
    meta: &RequestMeta,
    user_id: UserId,
    roles: &[String],
) -> ServiceResult<User> {
    set_roles(state, Manager::Operator(operator), meta, user_id, roles).await
}

async fn set_roles(
    state: &AppState,
    manager: Manager<'_>,
    meta: &RequestMeta,
    user_id: UserId,
    roles: &[String],
) -> ServiceResult<User> {
    let tx = state.store.begin(manager.tenant_id()).await?;
    let before = load_user(&tx, user_id).await?;
    let roles = checked_roles(&tx, manager, roles).await?;
    let had_owner = before
        .roles
        .iter()
        .any(|role| role == BuiltInRole::Owner.name());
    let keeps_owner = roles.iter().any(|role| role == BuiltInRole::Owner.name());
    if had_owner && !keeps_owner {
        require_owner(&tx, manager).await?;
    }
    store::users::set_roles(&tx, user_id, &roles).await?;
    ensure_an_active_owner(&tx).await?;
    audit::record(
        state,
        &tx,
        meta,
        &manager.actor(),
        "user.set_roles",
        Some(&format!("user:{user_id}")),
        Some(json!({"before": before.roles, "after": roles})),
    )
    .await?;
    tx.commit().await?;
    Ok(User { roles, ..before })
}

async fn ensure_an_active_owner(tx: &TenantTx) -> ServiceResult<()> {
    if store::users::count_active_owners(tx).await? == 0 {
        return Err(ServiceError::Conflict(
            "a tenant must keep at least one active owner".to_owned(),
        ));
    }
    Ok(())
}

#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn deactivate_user(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    user_id: &str,
) -> ServiceResult<User> {
    let principal = require_account_manager(principal, Permission::UsersManage)?;
    let user_id = parse_id(user_id, "userId", "user").map(UserId)?;
    deactivate(state, Manager::User(principal), meta, user_id).await
}

/// `deactivate_user` for the operator.
#[tracing::instrument(skip_all, fields(tenant_id = %operator.tenant_id))]
pub async fn deactivate_user_as(
    state: &AppState,
    operator: &Operator,
    meta: &RequestMeta,
    user_id: UserId,
) -> ServiceResult<User> {
    deactivate(state, Manager::Operator(operator), meta, user_id).await
}

/// Deactivates a user: they cannot sign in, every session of theirs is revoked (an access token
/// stops working at its next request, which checks the user) and their unused links are retired.
async fn deactivate(
    state: &AppState,
    manager: Manager<'_>,
    meta: &RequestMeta,
    user_id: UserId,
) -> ServiceResult<User> {
    let now = state.now();
    let tx = state.store.begin(manager.tenant_id()).await?;
    let user = load_user(&tx, user_id).await?;
    if user
        .roles
        .iter()
        .any(|role| role == BuiltInRole::Owner.name())
    {
        require_owner(&tx, manager).await?;
    }
    store::users::set_status(&tx, user_id, UserStatus::Deactivated, now).await?;
    store::sessions::revoke_all_of_user(&tx, user_id, now).await?;
    store::tokens::retire_unused(&tx, user_id, PURPOSE_ACTIVATION, now).await?;
    store::tokens::retire_unused(&tx, user_id, PURPOSE_RESET, now).await?;
    ensure_an_active_owner(&tx).await?;
    audit::record(
        state,
        &tx,
        meta,
        &manager.actor(),
        "user.deactivate",
        Some(&format!("user:{user_id}")),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(User {
        status: UserStatus::Deactivated,
        ..user
    })
}

/// What reactivating a user did.
#[derive(Debug, Clone)]
pub struct Reactivation {
    pub user: User,
    /// A new activation token, when the user never set a password (they were deactivated while
    /// pending): they are pending again and were emailed a new link.
    pub activation_token: Option<String>,
}

/// Lets a deactivated user back in (operator only: the GraphQL API has no such mutation). A user
/// with a password is active again and signs in with it; one who never activated is pending
/// again and gets a new activation email, since deactivation retired their link.
#[tracing::instrument(skip_all, fields(tenant_id = %operator.tenant_id))]
pub async fn reactivate_user_as(
    state: &AppState,
    operator: &Operator,
    meta: &RequestMeta,
    user_id: UserId,
) -> ServiceResult<Reactivation> {
    let now = state.now();
    let tx = state.store.begin(operator.tenant_id).await?;
    let row = store::users::get(&tx, user_id)
        .await
        .map_err(|error| match error {
            store::StoreError::NotFound => ServiceError::NotFound("user"),
            other => other.into(),
        })?;
    if row.status != UserStatus::Deactivated.as_str() {
        return Err(ServiceError::Conflict(format!(
            "{} is not deactivated (status {})",
            row.email, row.status
        )));
    }
    let email = Email::parse(&row.email)?;
    let has_password = row.password_hash.is_some();
    let status = if has_password {
        UserStatus::Active
    } else {
        UserStatus::Pending
    };
    store::users::set_status(&tx, user_id, status, now).await?;
    let activation_token = if has_password {
        None
    } else {
        let tenant = store::tenants::get(&tx).await?;
        let token = issue_one_time_token(state, &tx, user_id, PURPOSE_ACTIVATION, now).await?;
        emails::queue_activation(state, &tx, &email, &tenant.name, &token).await?;
        Some(token)
    };
    audit::record(
        state,
        &tx,
        meta,
        &operator.actor(),
        "user.reactivate",
        Some(&format!("user:{user_id}")),
        Some(json!({"status": status.as_str()})),
    )
    .await?;
    let user = load_user(&tx, user_id).await?;
    tx.commit().await?;
    Ok(Reactivation {
        user,
        activation_token,
    })
}

#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn create_role(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    name: &str,
    permissions: &[Permission],
) -> ServiceResult<Role> {
    let principal = require_account_manager(principal, Permission::RolesManage)?;
    let name = RoleName::parse(name)?;
    if BuiltInRole::from_name(name.as_str()).is_some() {
        return Err(ServiceError::Conflict(format!(
            "{:?} is a built-in role",
            name.as_str()
        )));
    }
    // A principal cannot create a role more powerful than itself.
    if let Some(missing) = permissions
        .iter()
        .find(|permission| !principal.has(**permission))
    {
        return Err(ServiceError::Forbidden(format!(
            "you cannot grant {} because you do not hold it",
            missing.as_str()
        )));
    }
    let permissions: BTreeSet<Permission> = permissions.iter().copied().collect();
    let names: Vec<&str> = permissions
        .iter()
        .map(|permission| permission.as_str())
        .collect();
    let now = state.now();
    let tx = state.store.begin(principal.tenant_id).await?;
    let row = store::roles::insert(&tx, name.as_str(), &names, false, now).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "role.create",
        Some(&format!("role:{}", name.as_str())),
        Some(json!({"permissions": names})),
    )
    .await?;
    tx.commit().await?;
    Ok(role_from_row(&row))
}

#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn delete_role(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    name: &str,
) -> ServiceResult<bool> {
    let principal = require_account_manager(principal, Permission::RolesManage)?;
    let tx = state.store.begin(principal.tenant_id).await?;
    let role = store::roles::find(&tx, name.trim())
        .await?
        .ok_or(ServiceError::NotFound("role"))?;
    if role.built_in {
        return Err(ServiceError::Conflict(format!(
            "{:?} is a built-in role and cannot be deleted",
            role.name
        )));
    }
    let holders = store::users::count_with_role(&tx, &role.name).await?;
    if holders > 0 {
        return Err(ServiceError::Conflict(format!(
            "role {:?} is held by {holders} user(s); take it away from them first",
            role.name
        )));
    }
    store::roles::delete(&tx, &role.name).await?;
    audit::record(
        state,
        &tx,
        meta,
        &principal.actor(),
        "role.delete",
        Some(&format!("role:{}", role.name)),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn create_api_key(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    name: &str,
    scope: ApiKeyScope,
    channel: domain::ingest::Channel,
) -> ServiceResult<(ApiKey, String)> {
    let principal = require_account_manager(principal, Permission::ApiKeysManage)?;
    create_key(state, Manager::User(principal), meta, name, scope, channel).await
}

/// `create_api_key` for the operator.
#[tracing::instrument(skip_all, fields(tenant_id = %operator.tenant_id))]
pub async fn create_api_key_as(
    state: &AppState,
    operator: &Operator,
    meta: &RequestMeta,
    name: &str,
    scope: ApiKeyScope,
    channel: domain::ingest::Channel,
) -> ServiceResult<(ApiKey, String)> {
    create_key(
        state,
        Manager::Operator(operator),
        meta,
        name,
        scope,
        channel,
    )
    .await
}

async fn create_key(
    state: &AppState,
    manager: Manager<'_>,
    meta: &RequestMeta,
    name: &str,
    scope: ApiKeyScope,
    channel: domain::ingest::Channel,
) -> ServiceResult<(ApiKey, String)> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
        return Err(ServiceError::bad_input(
            "name",
            "name must be 1 to 200 characters without control characters",
        ));
    }
    let now = state.now();
    let tenant_id = manager.tenant_id();
    let tx = state.store.begin(tenant_id).await?;
    let prefix = match scope {
        ApiKeyScope::Write => WRITE_KEY_PREFIX,
        ApiKeyScope::Secret => SECRET_KEY_PREFIX,
    };
    let secret = secrets::generate(prefix, tenant_id);
    let id = ApiKeyId(Uuid::now_v7());
    let visible = secrets::visible_prefix(&secret.secret);
    let row = store::api_keys::insert(
        &tx,
        store::api_keys::NewApiKey {
            id,
            name,
            scope: scope.as_str(),
            prefix: &visible,
            key_hash: &secret.hash,
            created_by: manager.user_id().map(|id| id.as_uuid()),
            channel: channel.as_str(),
        },
        now,
    )
    .await?;
    audit::record(
        state,
        &tx,
        meta,
        &manager.actor(),
        "api_key.create",
        Some(&format!("api_key:{id}")),
        Some(json!({"name": name, "scope": scope.as_str(), "prefix": visible})),
    )
    .await?;
    tx.commit().await?;
    Ok((api_key_from_row(row), secret.secret))
}

#[tracing::instrument(skip_all, fields(tenant_id = ?principal.map(|p| p.tenant_id)))]
pub async fn revoke_api_key(
    state: &AppState,
    principal: Option<&Principal>,
    meta: &RequestMeta,
    id: &str,
) -> ServiceResult<ApiKey> {
    let principal = require_account_manager(principal, Permission::ApiKeysManage)?;
    let id = parse_id(id, "id", "api key").map(ApiKeyId)?;
    revoke_key(state, Manager::User(principal), meta, id).await
}

/// `revoke_api_key` for the operator.
#[tracing::instrument(skip_all, fields(tenant_id = %operator.tenant_id))]
pub async fn revoke_api_key_as(
    state: &AppState,
    operator: &Operator,
    meta: &RequestMeta,
    id: ApiKeyId,
) -> ServiceResult<ApiKey> {
    revoke_key(state, Manager::Operator(operator), meta, id).await
}

async fn revoke_key(
    state: &AppState,
    manager: Manager<'_>,
    meta: &RequestMeta,
    id: ApiKeyId,
) -> ServiceResult<ApiKey> {
    let now = state.now();
    let tx = state.store.begin(manager.tenant_id()).await?;
    store::api_keys::get(&tx, id)
        .await
        .map_err(|error| match error {
            store::StoreError::NotFound => ServiceError::NotFound("api key"),
            other => other.into(),
        })?;
    // The collection API reuses a write key's principal for a few seconds: forget every cached
    // key and cache none for the settle time, so that the revocation takes effect in this
    // process as soon as it commits.
    crate::auth::cache::WRITE_KEYS.invalidate(crate::auth::cache::REVOCATION_SETTLE);
    let row = store::api_keys::revoke(&tx, id, now).await?;
    audit::record(
        state,
        &tx,
        meta,
        &manager.actor(),
        "api_key.revoke",
        Some(&format!("api_key:{id}")),
        None,
    )
    .await?;
    tx.commit().await?;
    Ok(api_key_from_row(row))
}

pub async fn api_keys(
    state: &AppState,
    principal: Option<&Principal>,
) -> ServiceResult<Vec<ApiKey>> {
    let principal = require_account_manager(principal, Permission::ApiKeysManage)?;
    list_keys(state, principal.tenant_id).await
}

/// `api_keys` for the operator.
pub async fn api_keys_as(state: &AppState, operator: &Operator) -> ServiceResult<Vec<ApiKey>> {
    list_keys(state, operator.tenant_id).await
}

async fn list_keys(state: &AppState, tenant_id: TenantId) -> ServiceResult<Vec<ApiKey>> {
    let tx = state.store.read(tenant_id).await?;
    Ok(store::api_keys::list(&tx)
        .await?
        .into_iter()
        .map(api_key_from_row)
        .collect())
}

pub async fn me(state: &AppState, principal: Option<&Principal>) -> ServiceResult<Me> {
    let principal = require(principal)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let tenant = tenant_from_row(store::tenants::get(&tx).await?);
    let (user, api_key) = match &principal.kind {
        PrincipalKind::User { user_id, .. } => (Some(load_user(&tx, *user_id).await?), None),
        PrincipalKind::WriteKey { key_id, .. } | PrincipalKind::SecretKey { key_id, .. } => (
            None,
            Some(api_key_from_row(store::api_keys::get(&tx, *key_id).await?)),
        ),
    };
    Ok(Me {
        user,
        api_key,
        tenant,
        permissions: principal.permissions.iter().copied().collect(),
    })
}

pub async fn tenant(state: &AppState, principal: Option<&Principal>) -> ServiceResult<Tenant> {
    let principal = require(principal)?;
    let tx = state.store.read(principal.tenant_id).await?;
    Ok(tenant_from_row(store::tenants::get(&tx).await?))
}

pub async fn users(
    state: &AppState,
    principal: Option<&Principal>,
    first: Option<i32>,
    after: Option<&str>,
) -> ServiceResult<Page<User>> {
    let principal = require_permission(principal, Permission::UsersManage)?;
    users_page(state, principal.tenant_id, first, after).await
}

/// `users` for the operator.
pub async fn users_as(
    state: &AppState,
    operator: &Operator,
    first: Option<i32>,
    after: Option<&str>,
) -> ServiceResult<Page<User>> {
    users_page(state, operator.tenant_id, first, after).await
}

async fn users_page(
    state: &AppState,
    tenant_id: TenantId,
    first: Option<i32>,
    after: Option<&str>,
) -> ServiceResult<Page<User>> {
    let limit = page_size(first)?;
    let after = decode_cursor(after)?;
    let tx = state.store.read(tenant_id).await?;
    let (rows, total) = store::users::page(&tx, after, limit + 1).await?;
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    let role_pairs = store::users::roles_of_many(&tx, &ids).await?;
    Ok(build_page(
        rows,
        limit,
        Some(total),
        |row| row.id,
        |row| {
            let roles = role_pairs
                .iter()
                .filter(|(user_id, _)| *user_id == row.id)
                .map(|(_, role)| role.clone())
                .collect();
            user_from_row(row, roles)
        },
    ))
}

/// The user with this email, for the operator (who names users by email).
pub async fn user_by_email_as(
    state: &AppState,
    operator: &Operator,
    email: &str,
) -> ServiceResult<User> {
    let email = Email::parse(email)?;
    let tx = state.store.read(operator.tenant_id).await?;
    let row = store::users::find_by_email(&tx, &email)
        .await?
        .ok_or(ServiceError::NotFound("user"))?;
    load_user(&tx, UserId(row.id)).await
}

/// One tenant as the operator sees it in `cdp tenant list` and `cdp tenant show`.
#[derive(Debug, Clone)]
pub struct TenantOverview {
    pub tenant: Tenant,
    pub users: u64,
    /// Live profiles (merged tombstones are not counted).
    pub profiles: u64,
}

/// Every tenant, by slug, with its counts of users and profiles (each counted in a read of its
/// own tenant). For the operator only: no principal sees more than its tenant.
pub async fn tenants_overview(state: &AppState) -> ServiceResult<Vec<TenantOverview>> {
    let mut overviews = Vec::new();
    for row in store::tenants::list(&state.store).await? {
        overviews.push(overview_of(state, row).await?);
    }
    Ok(overviews)
}

/// One tenant by slug, with its counts; `NotFound("tenant")` when there is none.
pub async fn tenant_overview(state: &AppState, slug: &str) -> ServiceResult<TenantOverview> {
    let row = store::tenants::find_by_slug(&state.store, slug.trim())
        .await?
        .ok_or(ServiceError::NotFound("tenant"))?;
    overview_of(state, row).await
}

async fn overview_of(
    state: &AppState,
    row: store::tenants::TenantRow,
) -> ServiceResult<TenantOverview> {
    let tx = state.store.read(TenantId(row.id)).await?;
    let users = store::users::count(&tx).await?;
    let profiles = store::profiles::count_live(&tx).await?;
    Ok(TenantOverview {
        tenant: tenant_from_row(row),
        users,
        profiles,
    })
}

pub async fn roles(state: &AppState, principal: Option<&Principal>) -> ServiceResult<Vec<Role>> {
    let principal = require(principal)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let mut roles: Vec<Role> = store::roles::list(&tx)
        .await?
        .iter()
        .map(role_from_row)
        .collect();
    // Built-in roles first, in their documented order; custom roles after, oldest first (the
    // store's order, which the stable sort keeps).
    roles.sort_by_key(|role| {
        BuiltInRole::ALL
            .iter()
            .position(|built_in| role.built_in && built_in.name() == role.name)
            .unwrap_or(BuiltInRole::ALL.len())
    });
    Ok(roles)
}

/// Permissions of a user, for tools that need them without a request.
pub async fn user_permissions(
    state: &AppState,
    tenant_id: TenantId,
    user_id: UserId,
) -> ServiceResult<BTreeSet<Permission>> {
    let tx = state.store.read(tenant_id).await?;
    permissions_of_user(&tx, user_id).await
}

/// Parses an ID argument. A malformed ID is reported as not found, exactly like an ID of another
/// tenant, so that nothing can be learned from the difference.
fn parse_id(value: &str, _field: &str, what: &'static str) -> ServiceResult<Uuid> {
    Uuid::parse_str(value.trim()).map_err(|_| ServiceError::NotFound(what))
}
