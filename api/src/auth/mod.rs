//! Authentication: password hashing, access tokens (JWT), opaque secrets (refresh, one-time and
//! api keys), the principal of a request, login throttling and short-lived caches of write keys.

pub mod cache;
pub mod jwt;
pub mod password;
pub mod principal;
pub mod secrets;
pub mod throttle;

pub use principal::{Principal, PrincipalKind};
