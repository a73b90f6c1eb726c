//! Pure business rules of the CDP: value types that hold only valid values, and decisions that are
//! deterministic functions of their inputs.
//!
//! This crate knows nothing of async, databases, GraphQL, HTTP, JWT or email. It does no IO and
//! reads no clock: where time matters, `now` is a parameter.

pub mod account;
pub mod analytics;
pub mod condition;
pub mod identity;
pub mod ids;
pub mod ingest;
pub mod json;
pub mod lifecycle;
pub mod pii;
pub mod traits;

pub use account::mask_email;
pub use account::{
    AccountError, BuiltInRole, Email, Password, Permission, RoleName, TenantName, TenantSlug,
    UserStatus,
};
pub use ids::{ApiKeyId, TenantId, UserId};
