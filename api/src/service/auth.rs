//! Turning a bearer credential into a principal, checked against the database on every request:
//! a deactivated user, a changed role, a revoked session family or a revoked key takes effect at
//! once, never after the access token expires. An access token's standing is read again only
//! when its tenant's `auth_version` changed since this process last read it (ADR 0017).

use std::collections::BTreeSet;

use domain::{ApiKeyId, BuiltInRole, Permission, UserId, UserStatus};

use super::{AppState, ServiceError, ServiceResult};
use crate::auth::secrets::{self, SECRET_KEY_PREFIX, WRITE_KEY_PREFIX};
use crate::auth::{Principal, PrincipalKind};
use crate::store::{self, TenantTx};

fn unauthenticated() -> ServiceError {
    ServiceError::Unauthenticated("invalid or expired credentials".to_owned())
}

/// Authenticates the value of an `Authorization: Bearer …` header: an api key or an access token.
#[tracing::instrument(skip_all)]
pub async fn authenticate_bearer(state: &AppState, token: &str) -> ServiceResult<Principal> {
    let token = token.trim();
    if token.starts_with(WRITE_KEY_PREFIX) || token.starts_with(SECRET_KEY_PREFIX) {
        return authenticate_api_key(state, token).await;
    }
    let claims = state.jwt.verify(token).map_err(|error| {
        tracing::debug!(%error, "access token refused");
        unauthenticated()
    })?;
    let tenant_id = domain::TenantId(claims.tid);
    let user_id = UserId(claims.sub);
    let tx = state.store.read(tenant_id).await?;
    // The version of everything the standing depends on, read in this transaction before the
    // standing (ADR 0017); a tenant that no longer exists authenticates no one.
    let version = match store::tenants::auth_version(&tx).await {
        Err(store::StoreError::NotFound) => return Err(unauthenticated()),
        version => version?,
    };
    let cached = state
        .standings
        .get(tenant_id, user_id.as_uuid(), claims.sid, version);
    state.metrics.auth_standing(cached.is_some());
    let verdict = match cached {
        Some(verdict) => verdict,
        None => {
            let verdict = store::users::standing(&tx, user_id, claims.sid)
                .await?
                .filter(|standing| {
                    standing.status == UserStatus::Active.as_str() && !standing.family_revoked
                })
                .map(|standing| Principal {
                    tenant_id,
                    kind: PrincipalKind::User {
                        user_id,
                        email: standing.email,
                    },
                    permissions: permissions_of_roles(&standing.role_permissions),
                });
            state.standings.insert(
                tenant_id,
                user_id.as_uuid(),
                claims.sid,
                version,
                verdict.clone(),
            );
            verdict
        }
    };
    verdict.ok_or_else(unauthenticated)
}

/// When a bearer credential that [`authenticate_bearer`] accepted stops being valid: an access
/// token's expiry; none for an api key (valid until revoked).
pub fn bearer_expiry(state: &AppState, token: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let token = token.trim();
    if token.starts_with(WRITE_KEY_PREFIX) || token.starts_with(SECRET_KEY_PREFIX) {
        return None;
    }
    let claims = state.jwt.verify(token).ok()?;
    chrono::DateTime::from_timestamp(claims.exp, 0)
}

/// Authenticates an api key, whether it came as a bearer token, HTTP Basic or a `writeKey` field.
pub async fn authenticate_api_key(state: &AppState, key: &str) -> ServiceResult<Principal> {
    let (prefix, is_secret) = if key.starts_with(SECRET_KEY_PREFIX) {
        (SECRET_KEY_PREFIX, true)
    } else {
        (WRITE_KEY_PREFIX, false)
    };
    let tenant_id = secrets::tenant_of(prefix, key).ok_or_else(unauthenticated)?;
    let tx = state.store.read(tenant_id).await?;
    let row = store::api_keys::find_by_hash(&tx, &secrets::hash(key))
        .await?
        .ok_or_else(unauthenticated)?;
    if row.revoked_at.is_some() {
        return Err(unauthenticated());
    }
    let key_id = ApiKeyId(row.id);
    let channel = domain::ingest::Channel::parse(&row.channel);
    let (kind, permissions) = if is_secret && row.scope == "SECRET" {
        let permissions = BuiltInRole::Admin
            .permissions()
            .into_iter()
            .filter(|permission| !Permission::ACCOUNT_MANAGEMENT.contains(permission))
            .collect();
        (PrincipalKind::SecretKey { key_id, channel }, permissions)
    } else if !is_secret && row.scope == "WRITE" {
        (PrincipalKind::WriteKey { key_id, channel }, BTreeSet::new())
    } else {
        return Err(unauthenticated());
    };
    Ok(Principal {
        tenant_id,
        kind,
        permissions,
    })
}

/// The union of the permissions of a user's roles.
pub async fn permissions_of_user(
    tx: &TenantTx,
    user_id: UserId,
) -> ServiceResult<BTreeSet<Permission>> {
    let roles = store::roles::of_user(tx, user_id.as_uuid()).await?;
    Ok(permissions_of_roles(
        roles.iter().map(|role| &role.permissions),
    ))
}

/// The union of the permissions that roles' stored `permissions` lists name (unknown names,
/// from a newer or older release, are skipped).
fn permissions_of_roles<'a>(
    lists: impl IntoIterator<Item = &'a serde_json::Value>,
) -> BTreeSet<Permission> {
    lists
        .into_iter()
        .flat_map(store::roles::permission_names_in)
        .filter_map(|name| name.parse::<Permission>().ok())
        .collect()
}

/// Requires a signed-in principal.
pub fn require(principal: Option<&Principal>) -> ServiceResult<&Principal> {
    principal.ok_or_else(|| {
        ServiceError::Unauthenticated("sign in first: this operation needs a principal".to_owned())
    })
}

/// Requires a principal holding `permission`.
pub fn require_permission(
    principal: Option<&Principal>,
    permission: Permission,
) -> ServiceResult<&Principal> {
    let principal = require(principal)?;
    if !principal.has(permission) {
        return Err(ServiceError::Forbidden(format!(
            "this operation needs the {} permission",
            permission.as_str()
        )));
    }
    Ok(principal)
}
