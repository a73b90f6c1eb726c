//! SeaORM entities, one per table. Only `store` sees them.

pub mod api_keys;
pub mod audit_log;
pub mod email_outbox;
pub mod one_time_tokens;
pub mod refresh_sessions;
pub mod roles;
pub mod tenants;
pub mod user_roles;
pub mod users;
