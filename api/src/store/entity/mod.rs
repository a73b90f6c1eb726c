//! SeaORM entities, one per table. Only `store` sees them.

pub mod api_keys;
pub mod audit_log;
pub mod campaigns;
pub mod consents;
pub mod email_outbox;
pub mod events;
pub mod groups;
pub mod identities;
pub mod ingest_stats;
pub mod lifecycle_stages;
pub mod lifecycle_transitions;
pub mod merge_ledger;
pub mod one_time_tokens;
pub mod profile_groups;
pub mod profile_state;
pub mod profiles;
pub mod refresh_sessions;
pub mod roles;
pub mod segment_history;
pub mod segment_members;
pub mod segments;
pub mod tenants;
pub mod user_roles;
pub mod users;
pub mod webhook_deliveries;
pub mod webhooks;
