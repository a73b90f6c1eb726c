//! Use cases: load through `store`, let `domain` decide, persist, all inside tenant transactions.
//!
//! Guarantees: every operation that needs a principal checks its permission before it touches
//! data; every change made by an account operation is written to the audit log in the same
//! transaction; emails are queued in the outbox in the same transaction as the change that
//! causes them.

pub mod accounts;
pub mod analytics;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod bus;
pub mod campaigns;
pub mod definitions;
pub mod emails;
pub mod fanout;
pub mod ingest;
pub mod lifecycle;
pub mod limits;
pub mod observe;
pub mod pagination;
pub mod privacy;
pub mod profiles;
pub mod reactions;
pub mod realtime;
pub mod segments;
pub mod settings;
pub mod understand;
pub mod vault;
pub mod webhooks;

use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::auth::jwt::JwtKeys;
use crate::auth::password::Hasher;
use crate::auth::throttle::LoginThrottle;
use crate::config::Config;
use crate::store::{Store, StoreError};

/// The read scope of a read-only request (ADR 0012), for the edges that run one: every use case
/// called inside it reads through one shared transaction.
pub use crate::store::ReadScope;

/// Where the current time comes from; tests and the scheduler inject their own.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until it is moved: tests and benchmarks drive time-dependent work
/// (segment windows, the scheduler, churn) with it instead of sleeping.
#[derive(Debug)]
pub struct ManualClock {
    now: std::sync::Mutex<DateTime<Utc>>,
}

impl ManualClock {
    pub fn new(now: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: std::sync::Mutex::new(now),
        }
    }

    pub fn set(&self, now: DateTime<Utc>) {
        *self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = now;
    }

    pub fn advance(&self, by: chrono::Duration) {
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Everything a use case needs, shared by every request. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<Config>,
    pub jwt: JwtKeys,
    pub hasher: Hasher,
    pub login_throttle: Arc<LoginThrottle>,
    /// Standings of recently authenticated sessions, keyed by their tenant's `auth_version`.
    pub standings: Arc<crate::auth::standing::Standings>,
    pub clock: Arc<dyn Clock>,
    /// Committed membership changes and stage transitions, for subscriptions and campaigns.
    pub bus: bus::Bus,
    /// Live notices for subscriptions, and the limits on sockets and subscriptions.
    pub realtime: realtime::Realtime,
    /// The per-tenant writers of the ingestion write path.
    pub group_commit: Arc<ingest::GroupCommit>,
    /// The master keys and the unwrapped tenant keys of personal-data encryption.
    pub vault: Arc<vault::Vault>,
    /// Request rates per client address and per tenant.
    pub request_limits: Arc<limits::RequestLimits>,
    /// This process's counters and gauges, served at `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set when the process starts shutting down: readiness answers 503 from then on.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Turns true when the process stops: the listener stops accepting, background jobs finish
    /// what they hold, WebSockets are closed with 1001.
    pub stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

impl AppState {
    /// Whether the process is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl AppState {
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }
}

/// Facts about the request that the audit log records.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    pub ip: Option<String>,
}

/// The expected failures of a use case, plus one case for everything unexpected.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{message}")]
    BadInput { field: String, message: String },
    #[error("{0}")]
    Conflict(String),
    #[error("too many attempts; try again in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl ServiceError {
    pub fn bad_input(field: impl Into<String>, message: impl Into<String>) -> ServiceError {
        ServiceError::BadInput {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<StoreError> for ServiceError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound => ServiceError::NotFound("record"),
            StoreError::Conflict(message) => ServiceError::Conflict(message),
            StoreError::Raced(race) => ServiceError::Conflict(race.to_string()),
            StoreError::Db(error) => ServiceError::Unexpected(anyhow::Error::new(error)),
        }
    }
}

impl From<domain::AccountError> for ServiceError {
    fn from(error: domain::AccountError) -> Self {
        ServiceError::bad_input(error.field, format!("{} {}", error.field, error.reason))
    }
}

impl From<crate::auth::password::HashError> for ServiceError {
    fn from(error: crate::auth::password::HashError) -> Self {
        match error {
            // A full hashing queue is a flood, not a fault: the client may try again shortly.
            crate::auth::password::HashError::Busy => ServiceError::RateLimited {
                retry_after_secs: 1,
            },
            other => ServiceError::Unexpected(anyhow::Error::new(other)),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;
