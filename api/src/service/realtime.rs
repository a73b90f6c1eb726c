//! Live notices for subscriptions: a hub that reads the bus once per process, loads the details
//! subscribers need (the event, the profile) once per notice, and re-broadcasts them; and the
//! limits on open sockets and subscriptions per tenant.
//!
//! Guarantees: ingestion never waits for a subscriber (the bus and the hub's channel are
//! broadcast channels that drop the oldest notices for whoever falls behind, and say so with
//! [`LiveItem::Gap`]); details are loaded once per notice whatever the number of subscribers, and
//! masked per subscriber by [`LiveNotice::event`] and [`LiveNotice::profile`]; a permit counts
//! against its tenant's limit until it is dropped.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use domain::TenantId;
use serde_json::Value;
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::sync::Notify;
use uuid::Uuid;

use super::bus::{Notice, ProfileChangeKind, CAPACITY};
use super::profiles;
use super::AppState;
use crate::auth::Principal;
use crate::store::{self, Store, StoreResult};

/// Most notices the hub loads details for at once.
const HUB_BATCH: usize = 512;

/// The limits of one process, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Authenticated WebSocket connections per tenant (`CDP_WS_MAX_SOCKETS_PER_TENANT`).
    pub sockets_per_tenant: usize,
    /// Active subscriptions per tenant, over all its sockets (`CDP_WS_MAX_SUBSCRIPTIONS_PER_TENANT`).
    pub subscriptions_per_tenant: usize,
}

/// A refusal because a tenant reached a limit; the message says which and how to raise it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct LimitReached(String);

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum LiveItem {
    Notice(Arc<LiveNotice>),
    /// Notices were lost before this point: the subscriber (or the hub) fell behind, or details
    /// could not be loaded. The text says which.
    Gap(String),
}

/// A committed notice with the details subscribers need, loaded once.
#[derive(Debug)]
pub struct LiveNotice {
    pub notice: Notice,
    /// Opened, not masked: [`LiveNotice::event`] and [`LiveNotice::profile`] mask per subscriber.
    detail: Detail,
    /// The tenant's personal-data keys, to mask with.
    pii: domain::pii::PiiKeys,
}

#[derive(Debug)]
enum Detail {
    None,
    Event(Option<store::events::EventRow>),
    /// The profile as it is now (the survivor, for a merge); none for an erased profile.
    Profile(Option<store::profiles::ProfileRow>),
}

impl LiveNotice {
    /// The details are opened already: only masking is left to do.
    fn reveal(&self, principal: &Principal) -> profiles::Reveal {
        profiles::Reveal::new(
            super::vault::Opener::empty(),
            self.pii.clone(),
            profiles::masks(principal),
        )
    }

    /// The stored event of an `EventIngested` notice, masked for `principal`.
    pub fn event(&self, principal: &Principal) -> Option<profiles::Event> {
        match &self.detail {
            Detail::Event(Some(row)) => Some(profiles::event_from_row(
                row.clone(),
                &self.reveal(principal),
            )),
            _ => None,
        }
    }

    /// The profile of a `ProfileChanged` notice, masked for `principal`.
    pub fn profile(&self, principal: &Principal) -> Option<profiles::Profile> {
        match &self.detail {
            Detail::Profile(Some(row)) => Some(profiles::profile_from_row(
                row.clone(),
                &self.reveal(principal),
            )),
            _ => None,
        }
    }
}

/// The live state of one process. Cheap to clone.
#[derive(Clone)]
pub struct Realtime {
    inner: Arc<Inner>,
}

struct Inner {
    limits: Limits,
    sockets: Mutex<HashMap<TenantId, usize>>,
    subscriptions: Mutex<HashMap<TenantId, usize>>,
    /// The hub's channel, created (and the hub started) by the first subscription.
    hub: OnceLock<broadcast::Sender<LiveItem>>,
    /// Woken whenever a subscription starts.
    subscribed: Notify,
}

/// Which counter a permit holds.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Socket,
    Subscription,
}

/// One open socket or subscription, counted against its tenant until dropped.
pub struct Permit {
    inner: Arc<Inner>,
    tenant_id: TenantId,
    kind: Kind,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Permit")
            .field("tenant_id", &self.tenant_id)
            .field("kind", &self.kind)
            .finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let counts = self.inner.counts(self.kind);
        let mut counts = counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.tenant_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.tenant_id);
            }
        }
    }
}

impl Inner {
    fn counts(&self, kind: Kind) -> &Mutex<HashMap<TenantId, usize>> {
        match kind {
            Kind::Socket => &self.sockets,
            Kind::Subscription => &self.subscriptions,
        }
    }
}

impl Realtime {
    pub fn new(limits: Limits) -> Realtime {
        Realtime {
            inner: Arc::new(Inner {
                limits,
                sockets: Mutex::default(),
                subscriptions: Mutex::default(),
                hub: OnceLock::new(),
                subscribed: Notify::new(),
            }),
        }
    }

    fn acquire(&self, tenant_id: TenantId, kind: Kind) -> Result<Permit, LimitReached> {
        let (limit, what, variable) = match kind {
            Kind::Socket => (
                self.inner.limits.sockets_per_tenant,
                "open sockets",
                "CDP_WS_MAX_SOCKETS_PER_TENANT",
            ),
            Kind::Subscription => (
                self.inner.limits.subscriptions_per_tenant,
                "active subscriptions",
                "CDP_WS_MAX_SUBSCRIPTIONS_PER_TENANT",
            ),
        };
        let mut counts = self
            .inner
            .counts(kind)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(tenant_id).or_insert(0);
        if *count >= limit {
            return Err(LimitReached(format!(
                "this tenant already has {limit} {what}, the limit ({variable})"
            )));
        }
        *count += 1;
        Ok(Permit {
            inner: self.inner.clone(),
            tenant_id,
            kind,
        })
    }

    /// Counts an authenticated socket of `tenant_id`, or refuses it over the limit.
    pub fn open_socket(&self, tenant_id: TenantId) -> Result<Permit, LimitReached> {
        self.acquire(tenant_id, Kind::Socket)
    }

    /// Counts a subscription of `tenant_id` and returns it with a receiver of live notices (of
    /// every tenant: the caller filters), or refuses it over the limit.
    pub fn subscribe(
        &self,
        state: &AppState,
        tenant_id: TenantId,
    ) -> Result<(Permit, broadcast::Receiver<LiveItem>), LimitReached> {
        let permit = self.acquire(tenant_id, Kind::Subscription)?;
        let sender = self.inner.hub.get_or_init(|| {
            let (sender, _) = broadcast::channel(CAPACITY);
            tokio::spawn(hub(
                state.store.clone(),
                state.vault.clone(),
                state.bus.subscribe(),
                sender.clone(),
            ));
            sender
        });
        let receiver = sender.subscribe();
        self.inner.subscribed.notify_waiters();
        Ok((permit, receiver))
    }

    /// Open sockets and active subscriptions of every tenant in this process.
    pub fn totals(&self) -> (usize, usize) {
        let sum = |kind| {
            self.inner
                .counts(kind)
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .sum()
        };
        (sum(Kind::Socket), sum(Kind::Subscription))
    }

    /// Active subscriptions of a tenant in this process.
    pub fn subscriptions_of(&self, tenant_id: TenantId) -> usize {
        self.inner
            .subscriptions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&tenant_id)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until a tenant has at least `count` active subscriptions, each already receiving
    /// notices: tests and benchmarks start publishing only then.
    pub async fn wait_for_subscriptions(&self, tenant_id: TenantId, count: usize) {
        loop {
            let notified = self.inner.subscribed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.subscriptions_of(tenant_id) >= count {
                return;
            }
            notified.await;
        }
    }
}

/// Reads the bus, loads details in batches and re-broadcasts. Ends when the bus closes.
async fn hub(
    store: Store,
    vault: Arc<super::vault::Vault>,
    mut bus: broadcast::Receiver<Notice>,
    sender: broadcast::Sender<LiveItem>,
) {
    loop {
        let mut batch = Vec::new();
        let mut missed = None;
        match bus.recv().await {
            Ok(notice) => batch.push(notice),
            Err(RecvError::Lagged(count)) => missed = Some(count),
            Err(RecvError::Closed) => return,
        }
        while missed.is_none() && batch.len() < HUB_BATCH {
            match bus.try_recv() {
                Ok(notice) => batch.push(notice),
                Err(TryRecvError::Lagged(count)) => missed = Some(count),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Closed) => return,
            }
        }
        if sender.receiver_count() == 0 {
            continue;
        }
        if !batch.is_empty() {
            match load(&store, &vault, batch).await {
                Ok(items) => {
                    for item in items {
                        let _ = sender.send(LiveItem::Notice(Arc::new(item)));
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "realtime: cannot load the details of notices");
                    let _ = sender.send(LiveItem::Gap(
                        "notices were lost: their details could not be loaded".to_owned(),
                    ));
                }
            }
        }
        if let Some(count) = missed {
            tracing::warn!(missed = count, "realtime: the hub fell behind the bus");
            let _ = sender.send(LiveItem::Gap(format!(
                "{count} notices were lost: the server fell behind"
            )));
        }
    }
}

/// Loads, per tenant in one read transaction, the events and profiles the notices name.
async fn load(
    store: &Store,
    vault: &super::vault::Vault,
    batch: Vec<Notice>,
) -> StoreResult<Vec<LiveNotice>> {
    let mut event_ids: HashMap<TenantId, Vec<Uuid>> = HashMap::new();
    let mut profile_ids: HashMap<TenantId, BTreeSet<Uuid>> = HashMap::new();
    for notice in &batch {
        match notice {
            Notice::EventIngested {
                tenant_id,
                event_id,
                ..
            } => event_ids.entry(*tenant_id).or_default().push(*event_id),
            Notice::ProfileChanged {
                tenant_id,
                profile_id,
                kind,
            } => {
                let shown = match kind {
                    ProfileChangeKind::Created | ProfileChangeKind::Updated => Some(*profile_id),
                    ProfileChangeKind::Merged { into } => Some(*into),
                    ProfileChangeKind::Erased => None,
                };
                if let Some(id) = shown {
                    profile_ids.entry(*tenant_id).or_default().insert(id);
                }
            }
            _ => {}
        }
    }
    let tenants: BTreeSet<TenantId> = event_ids
        .keys()
        .chain(profile_ids.keys())
        .copied()
        .collect();
    let mut events = HashMap::new();
    let mut profiles = HashMap::new();
    let mut pii_keys = HashMap::new();
    for tenant_id in tenants {
        let tx = store.read(tenant_id).await?;
        let mut event_rows = Vec::new();
        let mut profile_rows = Vec::new();
        if let Some(ids) = event_ids.get(&tenant_id) {
            event_rows = store::fanout::events_by_ids(&tx, ids).await?;
        }
        if let Some(ids) = profile_ids.get(&tenant_id) {
            let ids: Vec<Uuid> = ids.iter().copied().collect();
            profile_rows = store::profiles::get_many(&tx, &ids).await?;
        }
        // Opened once here; each subscriber then sees them masked or not (see `LiveNotice`).
        let opener = vault
            .opener(
                &tx,
                event_rows
                    .iter()
                    .map(|row| &row.properties)
                    .chain(profile_rows.iter().map(|row| &row.traits)),
            )
            .await?;
        for mut row in event_rows {
            row.properties = opener.open_object_owned(std::mem::take(&mut row.properties));
            row.context = Value::Null;
            events.insert(row.id, row);
        }
        for mut row in profile_rows {
            row.traits = opener.open_object_owned(std::mem::take(&mut row.traits));
            profiles.insert(row.id, row);
        }
        let pii = super::privacy::settings_in(&tx)
            .await
            .map(|settings| settings.pii_keys())
            .unwrap_or_default();
        pii_keys.insert(tenant_id, pii);
    }
    Ok(batch
        .into_iter()
        .map(|notice| {
            let detail = match &notice {
                Notice::EventIngested { event_id, .. } => {
                    Detail::Event(events.get(event_id).cloned())
                }
                Notice::ProfileChanged {
                    profile_id, kind, ..
                } => Detail::Profile(match kind {
                    ProfileChangeKind::Created | ProfileChangeKind::Updated => {
                        profiles.get(profile_id).cloned()
                    }
                    ProfileChangeKind::Merged { into } => profiles.get(into).cloned(),
                    ProfileChangeKind::Erased => None,
                }),
                _ => Detail::None,
            };
            let pii = pii_keys
                .get(&notice.tenant_id())
                .cloned()
                .unwrap_or_default();
            LiveNotice {
                notice,
                detail,
                pii,
            }
        })
        .collect())
}
