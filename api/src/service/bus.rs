//! The in-process event bus: every profile change, stored event, segment membership change,
//! lifecycle transition and email delivery change is published here once its transaction has
//! committed. Subscriptions listen (campaign triggers run inside the write transaction instead,
//! so that an email is queued atomically with its cause).
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

/// How a profile changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileChangeKind {
    Created,
    Updated,
    /// Merged into another profile (the notice names the merged-away profile).
    Merged {
        into: Uuid,
    },
    Erased,
}

impl ProfileChangeKind {
    /// The contract's name: CREATED, UPDATED, MERGED or ERASED.
    pub fn as_str(self) -> &'static str {
        match self {
            ProfileChangeKind::Created => "CREATED",
            ProfileChangeKind::Updated => "UPDATED",
            ProfileChangeKind::Merged { .. } => "MERGED",
            ProfileChangeKind::Erased => "ERASED",
        }
    }
}

/// Something that happened to customer data, committed.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    ProfileChanged {
        tenant_id: TenantId,
        profile_id: Uuid,
        kind: ProfileChangeKind,
    },
    /// An event was stored (details are read by id).
    EventIngested {
        tenant_id: TenantId,
        event_id: Uuid,
        profile_id: Uuid,
        name: Option<String>,
    },
    /// A queued email changed status (details are read by id; the status is the one this
    /// notice announces, which the row may already have left when a subscriber reads it).
    EmailDelivery {
        tenant_id: TenantId,
        delivery_id: Uuid,
        campaign_id: Option<Uuid>,
        status: &'static str,
    },
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
    /// The profile the notice is about, if any.
    pub fn profile_id(&self) -> Option<Uuid> {
        match self {
            Notice::ProfileChanged { profile_id, .. }
            | Notice::EventIngested { profile_id, .. }
            | Notice::SegmentMembership { profile_id, .. }
            | Notice::StageTransition { profile_id, .. } => Some(*profile_id),
            Notice::EmailDelivery { .. } => None,
        }
    }

    pub fn tenant_id(&self) -> TenantId {
        match self {
            Notice::ProfileChanged { tenant_id, .. }
            | Notice::EventIngested { tenant_id, .. }
            | Notice::EmailDelivery { tenant_id, .. }
            | Notice::SegmentMembership { tenant_id, .. }
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
