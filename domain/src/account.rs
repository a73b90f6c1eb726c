//! Accounts of the people who operate a tenant: tenant slugs, account emails, passwords,
//! permissions and the built-in roles.
//!
//! Every type here can only hold a valid value: parse once at the edge, then trust the type.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Why an account value was refused. `field` names the input that was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct AccountError {
    pub field: &'static str,
    pub reason: String,
}

impl AccountError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// A tenant's URL-safe handle: 3 to 63 characters of lowercase ASCII letters, digits and dashes,
/// neither starting nor ending with a dash.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TenantSlug(String); // Invariant: matches the rule above.

impl TenantSlug {
    pub fn parse(input: &str) -> Result<Self, AccountError> {
        let field = "tenantSlug";
        let slug = input.trim();
        if slug.len() < 3 || slug.len() > 63 {
            return Err(AccountError::new(field, "must be 3 to 63 characters long"));
        }
        if !slug
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(AccountError::new(
                field,
                "may contain only lowercase letters, digits and dashes",
            ));
        }
        if slug.starts_with('-') || slug.ends_with('-') {
            return Err(AccountError::new(
                field,
                "must not start or end with a dash",
            ));
        }
        Ok(Self(slug.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tenant's display name: 1 to 200 characters, trimmed, without control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantName(String); // Invariant: as described above.

impl TenantName {
    pub fn parse(input: &str) -> Result<Self, AccountError> {
        let name = input.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(AccountError::new(
                "tenantName",
                "must be 1 to 200 characters long",
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(AccountError::new(
                "tenantName",
                "must not contain control characters",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An email address, trimmed, lower-cased and syntax-checked (RFC 5322 addr-spec with a dotted
/// domain). Lower-casing the local part is what users expect of a login name, even though RFC 5321
/// allows case-sensitive local parts; no mainstream mail provider treats them so.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Email(String); // Invariant: normalized and syntactically valid.

impl Email {
    pub fn parse(input: &str) -> Result<Self, AccountError> {
        let field = "email";
        let email = input.trim().to_lowercase();
        if email.len() > 254 {
            return Err(AccountError::new(field, "is longer than 254 characters"));
        }
        // CR, LF and other control characters would allow header injection further down.
        if email.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(AccountError::new(
                field,
                "must not contain whitespace or control characters",
            ));
        }
        let parsed = email_address::EmailAddress::from_str(&email).map_err(|error| {
            AccountError::new(field, format!("is not a valid email address ({error})"))
        })?;
        let domain = parsed.domain();
        if !domain.contains('.') || domain.starts_with('[') {
            return Err(AccountError::new(
                field,
                "must have a domain name such as example.com",
            ));
        }
        Ok(Self(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The address with most of its local part hidden, as shown to principals without PII access.
    pub fn masked(&self) -> String {
        mask_email(&self.0)
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Masks an email-like string the way the contract shows it: `j***@example.com`.
pub fn mask_email(value: &str) -> String {
    match value.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

/// A new password that satisfies the policy: at least 10 and at most 1024 characters.
/// The upper bound keeps hashing cost bounded.
pub struct Password(String); // Invariant: satisfies the policy.

impl Password {
    pub const MIN_CHARS: usize = 10;
    pub const MAX_CHARS: usize = 1024;

    pub fn parse(input: &str) -> Result<Self, AccountError> {
        let count = input.chars().count();
        if count < Self::MIN_CHARS {
            return Err(AccountError::new(
                "password",
                format!("must be at least {} characters long", Self::MIN_CHARS),
            ));
        }
        if count > Self::MAX_CHARS {
            return Err(AccountError::new(
                "password",
                format!("must be at most {} characters long", Self::MAX_CHARS),
            ));
        }
        Ok(Self(input.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// A role name: 1 to 64 characters of lowercase letters, digits, dashes and underscores.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleName(String); // Invariant: as described above.

impl RoleName {
    pub fn parse(input: &str) -> Result<Self, AccountError> {
        let name = input.trim();
        if name.is_empty() || name.len() > 64 {
            return Err(AccountError::new("name", "must be 1 to 64 characters long"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(AccountError::new(
                "name",
                "may contain only lowercase letters, digits, dashes and underscores",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_owner(&self) -> bool {
        self.0 == BuiltInRole::Owner.name()
    }
}

impl fmt::Display for RoleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a principal may do. The names are the contract's `Permission` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    UsersManage,
    RolesManage,
    ApiKeysManage,
    ProfilesRead,
    ProfilesWrite,
    PiiRead,
    SegmentsManage,
    CampaignsManage,
    PrivacyManage,
    AuditRead,
}

impl Permission {
    pub const ALL: [Permission; 10] = [
        Permission::UsersManage,
        Permission::RolesManage,
        Permission::ApiKeysManage,
        Permission::ProfilesRead,
        Permission::ProfilesWrite,
        Permission::PiiRead,
        Permission::SegmentsManage,
        Permission::CampaignsManage,
        Permission::PrivacyManage,
        Permission::AuditRead,
    ];

    /// The permissions that manage accounts; SECRET api keys never hold them.
    pub const ACCOUNT_MANAGEMENT: [Permission; 3] = [
        Permission::UsersManage,
        Permission::RolesManage,
        Permission::ApiKeysManage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::UsersManage => "USERS_MANAGE",
            Permission::RolesManage => "ROLES_MANAGE",
            Permission::ApiKeysManage => "API_KEYS_MANAGE",
            Permission::ProfilesRead => "PROFILES_READ",
            Permission::ProfilesWrite => "PROFILES_WRITE",
            Permission::PiiRead => "PII_READ",
            Permission::SegmentsManage => "SEGMENTS_MANAGE",
            Permission::CampaignsManage => "CAMPAIGNS_MANAGE",
            Permission::PrivacyManage => "PRIVACY_MANAGE",
            Permission::AuditRead => "AUDIT_READ",
        }
    }
}

impl FromStr for Permission {
    type Err = AccountError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Permission::ALL
            .into_iter()
            .find(|permission| permission.as_str() == s)
            .ok_or_else(|| AccountError::new("permissions", format!("unknown permission {s:?}")))
    }
}

/// The roles every tenant starts with. Their permissions are fixed; see `docs/api.md` for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltInRole {
    Owner,
    Admin,
    Marketer,
    Analyst,
    Viewer,
}

impl BuiltInRole {
    pub const ALL: [BuiltInRole; 5] = [
        BuiltInRole::Owner,
        BuiltInRole::Admin,
        BuiltInRole::Marketer,
        BuiltInRole::Analyst,
        BuiltInRole::Viewer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BuiltInRole::Owner => "owner",
            BuiltInRole::Admin => "admin",
            BuiltInRole::Marketer => "marketer",
            BuiltInRole::Analyst => "analyst",
            BuiltInRole::Viewer => "viewer",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|role| role.name() == name)
    }

    pub fn permissions(self) -> BTreeSet<Permission> {
        use Permission::*;
        match self {
            BuiltInRole::Owner | BuiltInRole::Admin => Permission::ALL.into_iter().collect(),
            BuiltInRole::Marketer => [
                ProfilesRead,
                ProfilesWrite,
                PiiRead,
                SegmentsManage,
                CampaignsManage,
            ]
            .into_iter()
            .collect(),
            // Analysts work with aggregates and segments; they see PII masked.
            BuiltInRole::Analyst => [ProfilesRead, SegmentsManage].into_iter().collect(),
            BuiltInRole::Viewer => [ProfilesRead].into_iter().collect(),
        }
    }
}

/// The life of a user account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserStatus {
    /// Invited or signed up, not yet activated: cannot sign in.
    Pending,
    Active,
    /// Switched off by an admin: every token and session of the user is refused.
    Deactivated,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Pending => "PENDING",
            UserStatus::Active => "ACTIVE",
            UserStatus::Deactivated => "DEACTIVATED",
        }
    }
}

impl FromStr for UserStatus {
    type Err = AccountError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "PENDING" => Ok(UserStatus::Pending),
            "ACTIVE" => Ok(UserStatus::Active),
            "DEACTIVATED" => Ok(UserStatus::Deactivated),
            other => Err(AccountError::new(
                "status",
                format!("unknown status {other:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_follow_the_rule() {
        for good in ["acme", "acme-inc", "a1b", "0-0"] {
            assert!(TenantSlug::parse(good).is_ok(), "{good} should be accepted");
        }
        for bad in [
            "",
            "ab",
            "Acme",
            "acme_inc",
            "-acme",
            "acme-",
            "ac me",
            "ä-co",
            &"a".repeat(64),
        ] {
            assert!(TenantSlug::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn emails_are_normalized_and_checked() {
        assert_eq!(
            Email::parse("  Ada@Example.COM ").map(|e| e.0),
            Ok("ada@example.com".to_owned())
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@localhost",
            "a b@example.com",
            "ada@example.com\r\nBcc: x@y.z",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn emails_mask_their_local_part() {
        assert_eq!(mask_email("jane@example.com"), "j***@example.com");
        assert_eq!(mask_email("nonsense"), "***");
    }

    #[test]
    fn passwords_need_ten_characters() {
        assert!(Password::parse("123456789").is_err());
        assert!(Password::parse("1234567890").is_ok());
        assert!(
            Password::parse("ääääääääää").is_ok(),
            "characters, not bytes, count"
        );
        assert!(Password::parse(&"x".repeat(1025)).is_err());
    }

    #[test]
    fn permissions_round_trip_through_their_names() {
        for permission in Permission::ALL {
            assert_eq!(permission.as_str().parse::<Permission>(), Ok(permission));
        }
        assert!("ROOT".parse::<Permission>().is_err());
    }

    #[test]
    fn built_in_roles_have_the_documented_permissions() {
        assert_eq!(
            BuiltInRole::Owner.permissions().len(),
            Permission::ALL.len()
        );
        assert_eq!(
            BuiltInRole::Admin.permissions().len(),
            Permission::ALL.len()
        );
        assert!(!BuiltInRole::Analyst
            .permissions()
            .contains(&Permission::PiiRead));
        assert!(BuiltInRole::Marketer
            .permissions()
            .contains(&Permission::CampaignsManage));
        assert_eq!(
            BuiltInRole::Viewer
                .permissions()
                .into_iter()
                .collect::<Vec<_>>(),
            vec![Permission::ProfilesRead]
        );
    }
}
