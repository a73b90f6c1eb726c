//! Authentication: password hashing, access tokens (JWT), opaque secrets (refresh, one-time and
//! api keys), the principal of a request, login throttling, short-lived caches of write keys,
//! and the versioned cache of session standings.

pub mod cache;
pub mod jwt;
pub mod password;
pub mod principal;
pub mod secrets;
pub mod standing;
pub mod throttle;

pub use principal::{Principal, PrincipalKind};
