//! Background work: the outbox worker and the scheduler. Every job stops when the shutdown
//! signal fires.

pub mod outbox;
pub mod scheduler;

/// A signal that tells background jobs to stop.
pub type Shutdown = tokio::sync::watch::Receiver<bool>;
