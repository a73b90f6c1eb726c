//! Background work: the outbox worker (and, later, the scheduler). Every job stops when the
//! shutdown signal fires.

pub mod outbox;

/// A signal that tells background jobs to stop.
pub type Shutdown = tokio::sync::watch::Receiver<bool>;
