//! The authenticated principal of a request: a user or an api key, always bound to one tenant.

use std::collections::BTreeSet;

use domain::ingest::Channel;
use domain::{ApiKeyId, Permission, TenantId, UserId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalKind {
    User {
        user_id: UserId,
        email: String,
    },
    /// A WRITE key may only send data; it is a source with a channel.
    WriteKey {
        key_id: ApiKeyId,
        channel: Channel,
    },
    /// A SECRET key acts with the admin role's permissions, without account management.
    SecretKey {
        key_id: ApiKeyId,
        channel: Channel,
    },
}

#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant_id: TenantId,
    pub kind: PrincipalKind,
    pub permissions: BTreeSet<Permission>,
}

impl Principal {
    pub fn has(&self, permission: Permission) -> bool {
        self.permissions.contains(&permission)
    }

    /// Whether the principal may send data (identify, track, the collection API).
    pub fn can_ingest(&self) -> bool {
        match self.kind {
            PrincipalKind::WriteKey { .. } | PrincipalKind::SecretKey { .. } => true,
            PrincipalKind::User { .. } => self.has(Permission::ProfilesWrite),
        }
    }

    /// The api key behind the principal and its channel, if it is a key.
    pub fn source(&self) -> Option<(ApiKeyId, Channel)> {
        match &self.kind {
            PrincipalKind::WriteKey { key_id, channel }
            | PrincipalKind::SecretKey { key_id, channel } => Some((*key_id, *channel)),
            PrincipalKind::User { .. } => None,
        }
    }

    pub fn user_id(&self) -> Option<UserId> {
        match &self.kind {
            PrincipalKind::User { user_id, .. } => Some(*user_id),
            _ => None,
        }
    }

    /// How the audit log names this principal.
    pub fn actor(&self) -> String {
        match &self.kind {
            PrincipalKind::User { user_id, email } => format!("user:{user_id} <{email}>"),
            PrincipalKind::WriteKey { key_id, .. } | PrincipalKind::SecretKey { key_id, .. } => {
                format!("api_key:{key_id}")
            }
        }
    }
}
