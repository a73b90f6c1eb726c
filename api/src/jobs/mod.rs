//! Background work: the outbox worker, the webhook worker and the scheduler. Every job stops
//! when the shutdown signal fires.

pub mod outbox;
pub mod scheduler;
pub mod webhooks;

/// A signal that tells background jobs to stop.
pub type Shutdown = tokio::sync::watch::Receiver<bool>;
