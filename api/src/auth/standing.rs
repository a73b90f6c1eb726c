//! The standings of recently authenticated sessions, per process, keyed by the tenant's
//! `auth_version` (ADR 0017).
//!
//! Authenticating an access token checks, on every request, what the database says of its user
//! and session: the user's status and e-mail, whether the session family was revoked, and the
//! permissions of the user's roles. The database raises the tenant's `auth_version` with every
//! change to any of those (triggers of the migration `m20261130_000020_auth_version`), and every
//! authentication reads that version in its own transaction. A standing kept here answers only a
//! request that read the very version it was kept under; any change committed anywhere since
//! (this replica, another one, the command line, a restore) is a new version, so the next request
//! reads the standing again.
//!
//! Guarantees: an answer is never older than the version its request read; a standing read under
//! an older version never replaces the tenant's newer ones; the cache holds at most
//! [`MAX_SESSIONS`] sessions of a tenant and [`MAX_TENANTS`] tenants, and starts over past
//! either, so a flood of tokens costs reads, not memory.

use std::collections::HashMap;
use std::sync::Mutex;

use domain::TenantId;
use uuid::Uuid;

use super::Principal;

/// Sessions of one tenant held at most.
pub const MAX_SESSIONS: usize = 10_000;
/// Tenants held at most.
pub const MAX_TENANTS: usize = 10_000;

/// What authenticating a session concluded: its principal, or refused (no such user, not active,
/// or the session family revoked).
pub type Verdict = Option<Principal>;

/// A session: the user and its session family (the access token's `sid`).
type Session = (Uuid, Uuid);

struct TenantStandings {
    version: i64,
    sessions: HashMap<Session, Verdict>,
}

/// This process's cache of session standings (one per [`crate::service::AppState`]).
#[derive(Default)]
pub struct Standings {
    tenants: Mutex<HashMap<TenantId, TenantStandings>>,
}

impl std::fmt::Debug for Standings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Standings").finish_non_exhaustive()
    }
}

impl Standings {
    pub fn new() -> Standings {
        Standings::default()
    }

    fn tenants(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, TenantStandings>> {
        // Every change under the lock is a single insert, replace or clear: a panic cannot leave
        // the map half-changed, so a poisoned lock is still usable.
        self.tenants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The verdict kept for `session` of `tenant` at `version`, the version the caller's
    /// transaction read; `None` when none is kept at that version.
    pub fn get(&self, tenant: TenantId, user: Uuid, family: Uuid, version: i64) -> Option<Verdict> {
        let tenants = self.tenants();
        let standings = tenants.get(&tenant)?;
        if standings.version != version {
            return None;
        }
        standings.sessions.get(&(user, family)).cloned()
    }

    /// Keeps `verdict`, read in a transaction that read `version` before it.
    pub fn insert(
        &self,
        tenant: TenantId,
        user: Uuid,
        family: Uuid,
        version: i64,
        verdict: Verdict,
    ) {
        let mut tenants = self.tenants();
        if tenants.len() >= MAX_TENANTS && !tenants.contains_key(&tenant) {
            tenants.clear();
        }
        let standings = tenants.entry(tenant).or_insert_with(|| TenantStandings {
            version,
            sessions: HashMap::new(),
        });
        if standings.version > version {
            // Read under an older version than the ones kept: a change committed since.
            return;
        }
        if standings.version < version || standings.sessions.len() >= MAX_SESSIONS {
            standings.version = version;
            standings.sessions.clear();
        }
        standings.sessions.insert((user, family), verdict);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::auth::PrincipalKind;

    fn principal(tenant: TenantId, user: Uuid, email: &str) -> Principal {
        Principal {
            tenant_id: tenant,
            kind: PrincipalKind::User {
                user_id: domain::UserId(user),
                email: email.to_owned(),
            },
            permissions: BTreeSet::from([domain::Permission::ProfilesRead]),
        }
    }

    /// Keeps the principal of `user` with `email` for (`user`, `family`) at `version`.
    fn keep(
        cache: &Standings,
        tenant: TenantId,
        user: Uuid,
        family: Uuid,
        version: i64,
        email: &str,
    ) {
        cache.insert(
            tenant,
            user,
            family,
            version,
            Some(principal(tenant, user, email)),
        );
    }

    fn email(verdict: &Verdict) -> Option<String> {
        match verdict.as_ref().map(|principal| &principal.kind) {
            Some(PrincipalKind::User { email, .. }) => Some(email.clone()),
            _ => None,
        }
    }

    #[test]
    fn a_standing_answers_only_the_version_it_was_read_under() {
        let cache = Standings::new();
        let tenant = TenantId(Uuid::new_v4());
        let (user, family) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(cache.get(tenant, user, family, 7).is_none());
        keep(&cache, tenant, user, family, 7, "a@x.example");
        let kept = cache.get(tenant, user, family, 7).expect("kept at 7");
        assert_eq!(email(&kept).as_deref(), Some("a@x.example"));
        // Another session, another tenant, another version: not answered.
        assert!(cache.get(tenant, user, Uuid::new_v4(), 7).is_none());
        assert!(cache
            .get(TenantId(Uuid::new_v4()), user, family, 7)
            .is_none());
        assert!(cache.get(tenant, user, family, 8).is_none());
        // A refusal is kept as well.
        let other = Uuid::new_v4();
        cache.insert(tenant, other, family, 7, None);
        assert!(matches!(cache.get(tenant, other, family, 7), Some(None)));
    }

    #[test]
    fn a_newer_version_drops_the_tenants_older_standings_and_an_older_read_never_returns() {
        let cache = Standings::new();
        let tenant = TenantId(Uuid::new_v4());
        let (user, family, second) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        keep(&cache, tenant, user, family, 7, "old@x.example");
        keep(&cache, tenant, user, second, 7, "old@x.example");
        keep(&cache, tenant, user, family, 9, "new@x.example");
        assert!(cache.get(tenant, user, second, 9).is_none());
        assert!(cache.get(tenant, user, second, 7).is_none());
        // A slow request that read version 7 finishes after the change: its standing is not kept.
        keep(&cache, tenant, user, family, 7, "old@x.example");
        assert!(cache.get(tenant, user, family, 7).is_none());
        let kept = cache.get(tenant, user, family, 9).expect("kept at 9");
        assert_eq!(email(&kept).as_deref(), Some("new@x.example"));
    }

    #[test]
    fn a_full_tenant_starts_over() {
        let cache = Standings::new();
        let tenant = TenantId(Uuid::new_v4());
        let family = Uuid::new_v4();
        let first = Uuid::new_v4();
        cache.insert(tenant, first, family, 1, None);
        for _ in 1..MAX_SESSIONS {
            cache.insert(tenant, Uuid::new_v4(), family, 1, None);
        }
        assert!(matches!(cache.get(tenant, first, family, 1), Some(None)));
        let last = Uuid::new_v4();
        cache.insert(tenant, last, family, 1, None);
        assert!(cache.get(tenant, first, family, 1).is_none());
        assert!(matches!(cache.get(tenant, last, family, 1), Some(None)));
    }
}
