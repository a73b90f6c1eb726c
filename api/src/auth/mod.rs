//! Authentication: password hashing, access tokens (JWT), opaque secrets (refresh, one-time and
//! api keys), the principal of a request and login throttling.

pub mod jwt;
pub mod password;
pub mod principal;
pub mod secrets;
pub mod throttle;

pub use principal::{Principal, PrincipalKind};
