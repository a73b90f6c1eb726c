//! Opaque secrets: refresh tokens, one-time tokens and api keys.
//!
//! A secret is `PREFIX` followed by base64url of 32 random bytes and the 16 bytes of its tenant id.
//! The tenant part only routes the lookup to the right tenant transaction; the secret is valid
//! only if its SHA-256 hash is found in that tenant. Secrets are stored only as hashes: they have
//! 256 bits of entropy, so a fast hash is enough (no password-style stretching needed).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use domain::TenantId;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const ACTIVATION_PREFIX: &str = "act_";
pub const RESET_PREFIX: &str = "rst_";
pub const REFRESH_PREFIX: &str = "rt_";
pub const WRITE_KEY_PREFIX: &str = "cdp_wk_";
pub const SECRET_KEY_PREFIX: &str = "cdp_sk_";

/// A freshly generated secret: shown once, stored as its hash.
pub struct NewSecret {
    pub secret: String,
    pub hash: String,
}

pub fn generate(prefix: &str, tenant_id: TenantId) -> NewSecret {
    let mut bytes = [0u8; 48];
    rand::rngs::OsRng.fill_bytes(&mut bytes[..32]);
    bytes[32..].copy_from_slice(tenant_id.as_uuid().as_bytes());
    let secret = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&secret);
    NewSecret { secret, hash }
}

/// The tenant a secret with this prefix claims to belong to, or None when it is malformed.
pub fn tenant_of(prefix: &str, secret: &str) -> Option<TenantId> {
    let body = secret.strip_prefix(prefix)?;
    if body.len() != 64 {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD.decode(body).ok()?;
    let tenant: [u8; 16] = bytes.get(32..48)?.try_into().ok()?;
    Some(TenantId(Uuid::from_bytes(tenant)))
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The visible part of an api key: its type prefix and the first 8 random characters.
pub fn visible_prefix(secret: &str) -> String {
    secret.chars().take(WRITE_KEY_PREFIX.len() + 8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_names_its_tenant_and_hashes_stably() {
        let tenant = TenantId(Uuid::new_v4());
        let new = generate(WRITE_KEY_PREFIX, tenant);
        assert_eq!(tenant_of(WRITE_KEY_PREFIX, &new.secret), Some(tenant));
        assert_eq!(tenant_of(SECRET_KEY_PREFIX, &new.secret), None);
        assert_eq!(hash(&new.secret), new.hash);
        assert!(visible_prefix(&new.secret).starts_with("cdp_wk_"));
        assert_eq!(visible_prefix(&new.secret).len(), 15);
    }

    #[test]
    fn malformed_secrets_name_no_tenant() {
        assert_eq!(tenant_of(REFRESH_PREFIX, "rt_short"), None);
        assert_eq!(
            tenant_of(REFRESH_PREFIX, &format!("rt_{}", "!".repeat(64))),
            None
        );
    }
}
