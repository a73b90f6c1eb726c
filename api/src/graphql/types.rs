//! Wire types of the accounts section: each is a promise to clients, converted from the service's
//! own types, never derived on them.

use async_graphql::{Enum, InputObject, Json, SimpleObject, ID};
use chrono::{DateTime, Utc};

use crate::service::{accounts, audit, pagination::Page};

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(name = "Permission")]
pub enum Permission {
    UsersManage,
    RolesManage,
    ApiKeysManage,
    ProfilesRead,
    ProfilesWrite,
    /// Without it, emails, phones and other PII come back masked (j***@example.com).
    PiiRead,
    SegmentsManage,
    CampaignsManage,
    PrivacyManage,
    AuditRead,
}

impl From<domain::Permission> for Permission {
    fn from(permission: domain::Permission) -> Self {
        use domain::Permission as D;
        match permission {
            D::UsersManage => Permission::UsersManage,
            D::RolesManage => Permission::RolesManage,
            D::ApiKeysManage => Permission::ApiKeysManage,
            D::ProfilesRead => Permission::ProfilesRead,
            D::ProfilesWrite => Permission::ProfilesWrite,
            D::PiiRead => Permission::PiiRead,
            D::SegmentsManage => Permission::SegmentsManage,
            D::CampaignsManage => Permission::CampaignsManage,
            D::PrivacyManage => Permission::PrivacyManage,
            D::AuditRead => Permission::AuditRead,
        }
    }
}

impl From<Permission> for domain::Permission {
    fn from(permission: Permission) -> Self {
        use domain::Permission as D;
        match permission {
            Permission::UsersManage => D::UsersManage,
            Permission::RolesManage => D::RolesManage,
            Permission::ApiKeysManage => D::ApiKeysManage,
            Permission::ProfilesRead => D::ProfilesRead,
            Permission::ProfilesWrite => D::ProfilesWrite,
            Permission::PiiRead => D::PiiRead,
            Permission::SegmentsManage => D::SegmentsManage,
            Permission::CampaignsManage => D::CampaignsManage,
            Permission::PrivacyManage => D::PrivacyManage,
            Permission::AuditRead => D::AuditRead,
        }
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum UserStatus {
    Pending,
    Active,
    Deactivated,
}

impl From<domain::UserStatus> for UserStatus {
    fn from(status: domain::UserStatus) -> Self {
        match status {
            domain::UserStatus::Pending => UserStatus::Pending,
            domain::UserStatus::Active => UserStatus::Active,
            domain::UserStatus::Deactivated => UserStatus::Deactivated,
        }
    }
}

/// WRITE keys may only send data (HTTP ingestion API and the identify/track mutations).
/// SECRET keys act with the permissions of the built-in admin role, without the account mutations.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum ApiKeyScope {
    Write,
    Secret,
}

impl From<accounts::ApiKeyScope> for ApiKeyScope {
    fn from(scope: accounts::ApiKeyScope) -> Self {
        match scope {
            accounts::ApiKeyScope::Write => ApiKeyScope::Write,
            accounts::ApiKeyScope::Secret => ApiKeyScope::Secret,
        }
    }
}

impl From<ApiKeyScope> for accounts::ApiKeyScope {
    fn from(scope: ApiKeyScope) -> Self {
        match scope {
            ApiKeyScope::Write => accounts::ApiKeyScope::Write,
            ApiKeyScope::Secret => accounts::ApiKeyScope::Secret,
        }
    }
}

/// Built-in roles every tenant starts with: owner (all), admin (all), marketer, analyst, viewer.
#[derive(SimpleObject, Clone, Debug)]
pub struct Role {
    pub name: String,
    pub permissions: Vec<Permission>,
    pub built_in: bool,
}

impl From<accounts::Role> for Role {
    fn from(role: accounts::Role) -> Self {
        Role {
            name: role.name,
            permissions: role.permissions.into_iter().map(Permission::from).collect(),
            built_in: role.built_in,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct User {
    pub id: ID,
    pub email: String,
    pub status: UserStatus,
    pub roles: Vec<String>,
    pub created_at: DateTime<Utc>,
}

impl From<accounts::User> for User {
    fn from(user: accounts::User) -> Self {
        User {
            id: ID(user.id.to_string()),
            email: user.email,
            status: user.status.into(),
            roles: user.roles,
            created_at: user.created_at,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Tenant {
    pub id: ID,
    pub slug: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

impl From<accounts::Tenant> for Tenant {
    fn from(tenant: accounts::Tenant) -> Self {
        Tenant {
            id: ID(tenant.id.to_string()),
            slug: tenant.slug,
            name: tenant.name,
            created_at: tenant.created_at,
        }
    }
}

/// The channel a source (a WRITE key) sends from.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum SourceChannel {
    Web,
    Mobile,
    Server,
    Email,
    Social,
    Other,
}

impl From<domain::ingest::Channel> for SourceChannel {
    fn from(channel: domain::ingest::Channel) -> Self {
        use domain::ingest::Channel as C;
        match channel {
            C::Web => SourceChannel::Web,
            C::Mobile => SourceChannel::Mobile,
            C::Server => SourceChannel::Server,
            C::Email => SourceChannel::Email,
            C::Social => SourceChannel::Social,
            C::Other => SourceChannel::Other,
        }
    }
}

impl From<SourceChannel> for domain::ingest::Channel {
    fn from(channel: SourceChannel) -> Self {
        use domain::ingest::Channel as C;
        match channel {
            SourceChannel::Web => C::Web,
            SourceChannel::Mobile => C::Mobile,
            SourceChannel::Server => C::Server,
            SourceChannel::Email => C::Email,
            SourceChannel::Social => C::Social,
            SourceChannel::Other => C::Other,
        }
    }
}

/// An api key; every WRITE key is a named source of data with a channel.
#[derive(SimpleObject, Clone, Debug)]
pub struct ApiKey {
    pub id: ID,
    pub name: String,
    pub scope: ApiKeyScope,
    pub channel: SourceChannel,
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<accounts::ApiKey> for ApiKey {
    fn from(key: accounts::ApiKey) -> Self {
        ApiKey {
            id: ID(key.id.to_string()),
            name: key.name,
            scope: key.scope.into(),
            channel: key.channel.into(),
            prefix: key.prefix,
            created_at: key.created_at,
            revoked_at: key.revoked_at,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct CreatedApiKey {
    pub api_key: ApiKey,
    /// The secret, shown here once and never again.
    pub secret: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Me {
    pub user: Option<User>,
    pub api_key: Option<ApiKey>,
    pub tenant: Tenant,
    pub permissions: Vec<Permission>,
}

impl From<accounts::Me> for Me {
    fn from(me: accounts::Me) -> Self {
        Me {
            user: me.user.map(User::from),
            api_key: me.api_key.map(ApiKey::from),
            tenant: me.tenant.into(),
            permissions: me.permissions.into_iter().map(Permission::from).collect(),
        }
    }
}

#[derive(InputObject, Debug)]
pub struct SignUpInput {
    pub tenant_name: String,
    pub tenant_slug: String,
    pub email: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct SignUpPayload {
    pub tenant: Tenant,
    pub user: User,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct AuthPayload {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_at: DateTime<Utc>,
    pub user: User,
}

impl From<accounts::Session> for AuthPayload {
    fn from(session: accounts::Session) -> Self {
        AuthPayload {
            access_token: session.access_token,
            refresh_token: session.refresh_token,
            expires_at: session.expires_at,
            user: session.user.into(),
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct PageInfo {
    pub has_next_page: bool,
    pub end_cursor: Option<String>,
}

impl PageInfo {
    pub fn of<T>(page: &Page<T>) -> PageInfo {
        PageInfo {
            has_next_page: page.has_next_page,
            end_cursor: page.end_cursor(),
        }
    }
}

fn count(total: u64) -> i32 {
    i32::try_from(total).unwrap_or(i32::MAX)
}

/// A connection's `totalCount`: a page's total, or 0 when it was not counted (the field was
/// not selected, so nobody reads it).
pub fn total_count(total: Option<u64>) -> i32 {
    total.map(count).unwrap_or(0)
}

#[derive(SimpleObject, Clone, Debug)]
pub struct UserEdge {
    pub node: User,
    pub cursor: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct UserConnection {
    pub edges: Vec<UserEdge>,
    pub page_info: PageInfo,
    pub total_count: i32,
}

impl From<Page<accounts::User>> for UserConnection {
    fn from(page: Page<accounts::User>) -> Self {
        let page_info = PageInfo::of(&page);
        UserConnection {
            total_count: total_count(page.total_count),
            edges: page
                .items
                .into_iter()
                .map(|(user, cursor)| UserEdge {
                    node: user.into(),
                    cursor,
                })
                .collect(),
            page_info,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct AuditEntry {
    pub id: ID,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub detail: Option<Json<serde_json::Value>>,
    /// The client address the change came from.
    pub ip: Option<String>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct AuditEntryEdge {
    pub node: AuditEntry,
    pub cursor: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct AuditEntryConnection {
    pub edges: Vec<AuditEntryEdge>,
    pub page_info: PageInfo,
    pub total_count: i32,
}

impl From<Page<audit::AuditEntry>> for AuditEntryConnection {
    fn from(page: Page<audit::AuditEntry>) -> Self {
        let page_info = PageInfo::of(&page);
        AuditEntryConnection {
            total_count: total_count(page.total_count),
            edges: page
                .items
                .into_iter()
                .map(|(entry, cursor)| AuditEntryEdge {
                    node: AuditEntry {
                        id: ID(entry.id.to_string()),
                        at: entry.at,
                        actor: entry.actor,
                        action: entry.action,
                        target: entry.target,
                        detail: entry.detail.map(Json),
                        ip: entry.ip,
                    },
                    cursor,
                })
                .collect(),
            page_info,
        }
    }
}
