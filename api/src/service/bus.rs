//! The in-process event bus: every segment membership change and lifecycle transition is
//! published here once its transaction has committed. Subscriptions and campaign triggers listen.
//!
//! Guarantees: a notice is published only after the change it describes is committed (callers
//! publish after `commit`); notices of one transaction are published in the order they were
//! decided. The bus is in-process and lossy for listeners that fall more than
//! [`CAPACITY`] notices behind (they see `Lagged` and must resynchronize from the database);
//! the history tables are the durable record.

use chrono::{DateTime, Utc};
use domain::TenantId;
use tokio::sync::broadcast;
use uuid::Uuid;

/// Notices kept for slow listeners before they lag.
pub const CAPACITY: usize = 4096;

/// Something that happened to a profile's understanding.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    SegmentMembership {
        tenant_id: TenantId,
        segment_id: Uuid,
        profile_id: Uuid,
        entered: bool,
        at: DateTime<Utc>,
        reason: String,
    },
    StageTransition {
        tenant_id: TenantId,
        profile_id: Uuid,
        from: Option<String>,
        to: Option<String>,
        at: DateTime<Utc>,
        reason: String,
    },
}

impl Notice {
    pub fn tenant_id(&self) -> TenantId {
        match self {
            Notice::SegmentMembership { tenant_id, .. }
            | Notice::StageTransition { tenant_id, .. } => *tenant_id,
        }
    }
}

/// A cheap-to-clone handle on the bus.
#[derive(Clone)]
pub struct Bus {
    sender: broadcast::Sender<Notice>,
}

impl Default for Bus {
    fn default() -> Self {
        Bus::new()
    }
}

impl Bus {
    pub fn new() -> Bus {
        let (sender, _) = broadcast::channel(CAPACITY);
        Bus { sender }
    }

    /// Publishes committed notices, in order. Having no listener is fine.
    pub fn publish(&self, notices: impl IntoIterator<Item = Notice>) {
        for notice in notices {
            let _ = self.sender.send(notice);
        }
    }

    /// A new listener, which sees every notice published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.sender.subscribe()
    }
}
