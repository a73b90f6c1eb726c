//! Access tokens: HS256 JWTs with the algorithm pinned and `exp`, `iat`, `iss`, `aud`, `sub`
//! (the user), `tid` (the tenant) and `sid` (the refresh-session family) required.

use chrono::{DateTime, Utc};
use domain::{TenantId, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const ISSUER: &str = "cdp";
pub const AUDIENCE: &str = "cdp-api";
/// Marks a token as an access token, so that no other token kind can stand in for one.
pub const ACCESS_TOKEN_TYPE: &str = "access";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    pub sub: Uuid,
    pub tid: Uuid,
    pub sid: Uuid,
    pub typ: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("invalid access token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("not an access token")]
    WrongType,
}

impl JwtKeys {
    pub fn new(secret: &[u8]) -> JwtKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = 5;
        validation.validate_exp = true;
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    pub fn issue(
        &self,
        user_id: UserId,
        tenant_id: TenantId,
        session_family: Uuid,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<String, JwtError> {
        let claims = AccessClaims {
            sub: user_id.as_uuid(),
            tid: tenant_id.as_uuid(),
            sid: session_family,
            typ: ACCESS_TOKEN_TYPE.to_owned(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    pub fn verify(&self, token: &str) -> Result<AccessClaims, JwtError> {
        let data = jsonwebtoken::decode::<AccessClaims>(token, &self.decoding, &self.validation)?;
        if data.claims.typ != ACCESS_TOKEN_TYPE {
            return Err(JwtError::WrongType);
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;

    fn keys() -> JwtKeys {
        JwtKeys::new(b"a-test-secret-that-is-long-enough-000000")
    }

    #[test]
    fn an_issued_token_verifies_with_its_claims() {
        let now = Utc::now();
        let user = UserId(Uuid::new_v4());
        let tenant = TenantId(Uuid::new_v4());
        let token = keys()
            .issue(
                user,
                tenant,
                Uuid::nil(),
                now,
                now + chrono::Duration::minutes(15),
            )
            .unwrap();
        let claims = keys().verify(&token).unwrap();
        assert_eq!(claims.sub, user.as_uuid());
        assert_eq!(claims.tid, tenant.as_uuid());
    }

    #[test]
    fn unsigned_expired_and_foreign_tokens_are_refused() {
        let now = Utc::now();
        let tenant = TenantId(Uuid::new_v4());
        let user = UserId(Uuid::new_v4());
        let expired = keys()
            .issue(
                user,
                tenant,
                Uuid::nil(),
                now - chrono::Duration::hours(2),
                now - chrono::Duration::hours(1),
            )
            .unwrap();
        assert!(keys().verify(&expired).is_err());

        let other = JwtKeys::new(b"another-secret-that-is-long-enough-11111")
            .issue(
                user,
                tenant,
                Uuid::nil(),
                now,
                now + chrono::Duration::minutes(5),
            )
            .unwrap();
        assert!(keys().verify(&other).is_err());

        let good = keys()
            .issue(
                user,
                tenant,
                Uuid::nil(),
                now,
                now + chrono::Duration::minutes(5),
            )
            .unwrap();
        let payload = good.split('.').nth(1).unwrap();
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        assert!(keys().verify(&format!("{none_header}.{payload}.")).is_err());
    }
}
