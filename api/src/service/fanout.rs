//! Fan-out of committed notices between processes that share one PostgreSQL database.
//!
//! Every write transaction announces its notices with `pg_notify` just before it commits
//! ([`announce`], called by `reactions::react`); PostgreSQL delivers a notification only when its
//! transaction commits, so a rolled-back change is never announced. Each process runs [`run`]: it
//! listens, ignores its own notifications (the payload names the origin store), loads the details
//! by id in a tenant transaction and publishes the notices on its local bus, where subscriptions
//! pick them up exactly as they pick up local ones.
//!
//! Guarantees: payloads hold only ids, kinds and times (no personal data), each under
//! [`MAX_PAYLOAD`] bytes (a large transaction sends several, in order); a lost listener connection
//! is re-established with backoff, and what was sent in between is lost (logged), as with a
//! lagging subscriber: the history tables stay the durable record. SQLite does none of this.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

use super::bus::{Notice, ProfileChangeKind};
use super::AppState;
use crate::store::{self, Backend, StoreResult, TenantTx};

/// Largest payload sent in one notification (PostgreSQL's limit is 8000 bytes).
pub const MAX_PAYLOAD: usize = 7000;

/// The version of the payload format; a process ignores payloads of another version.
const VERSION: u8 = 2;

/// One notice, by id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Entry {
    /// A profile change: (profile id, C | U | M | E, survivor of a merge).
    #[serde(rename = "p")]
    Profile(Uuid, char, Option<Uuid>),
    /// A stored event, by id.
    #[serde(rename = "e")]
    Event(Uuid),
    /// A membership change: (segment id, profile id, entered, at in microseconds).
    #[serde(rename = "s")]
    Segment(Uuid, Uuid, bool, i64),
    /// A stage transition: (profile id, at in microseconds).
    #[serde(rename = "l")]
    Stage(Uuid, i64),
    /// An email delivery changed status: (delivery id, campaign id, the status announced).
    #[serde(rename = "d")]
    Delivery(Uuid, Option<Uuid>, String),
}

#[derive(Debug, Deserialize)]
struct Payload {
    v: u8,
    /// The store (process) that sent it.
    o: Uuid,
    /// The tenant of every entry.
    t: Uuid,
    n: Vec<Entry>,
}

fn entry_of(notice: &Notice) -> Option<Entry> {
    Some(match notice {
        Notice::ProfileChanged {
            profile_id, kind, ..
        } => match kind {
            ProfileChangeKind::Created => Entry::Profile(*profile_id, 'C', None),
            ProfileChangeKind::Updated => Entry::Profile(*profile_id, 'U', None),
            ProfileChangeKind::Merged { into } => Entry::Profile(*profile_id, 'M', Some(*into)),
            ProfileChangeKind::Erased => Entry::Profile(*profile_id, 'E', None),
        },
        Notice::EventIngested { event_id, .. } => Entry::Event(*event_id),
        Notice::SegmentMembership {
            segment_id,
            profile_id,
            entered,
            at,
            ..
        } => Entry::Segment(*segment_id, *profile_id, *entered, at.timestamp_micros()),
        // A profile that leaves every stage has no transition row, and the contract's
        // LifecycleTransition always leads to a stage: nothing to announce.
        Notice::StageTransition {
            profile_id,
            to: Some(_),
            at,
            ..
        } => Entry::Stage(*profile_id, at.timestamp_micros()),
        Notice::StageTransition { to: None, .. } => return None,
        Notice::EmailDelivery {
            delivery_id,
            campaign_id,
            status,
            ..
        } => Entry::Delivery(*delivery_id, *campaign_id, (*status).to_owned()),
    })
}

/// The payloads announcing `notices` of one tenant, in order, each at most [`MAX_PAYLOAD`] bytes.
fn encode(origin: Uuid, tenant_id: Uuid, notices: &[Notice]) -> Vec<String> {
    let head = format!("{{\"v\":{VERSION},\"o\":\"{origin}\",\"t\":\"{tenant_id}\",\"n\":[");
    let mut payloads = Vec::new();
    let mut current = head.clone();
    let mut entries = 0;
    for entry in notices.iter().filter_map(entry_of) {
        // Serializing ids, chars, booleans and integers cannot fail.
        let Ok(text) = serde_json::to_string(&entry) else {
            continue;
        };
        if entries > 0 && current.len() + text.len() + 3 > MAX_PAYLOAD {
            current.push_str("]}");
            payloads.push(std::mem::replace(&mut current, head.clone()));
            entries = 0;
        }
        if entries > 0 {
            current.push(',');
        }
        current.push_str(&text);
        entries += 1;
    }
    if entries > 0 {
        current.push_str("]}");
        payloads.push(current);
    }
    payloads
}

/// Announces the notices of a transaction to the other processes; delivered on commit. Called
/// inside every write transaction by `reactions::react`. Nothing on SQLite.
pub async fn announce(tx: &TenantTx, backend: Backend, notices: &[Notice]) -> StoreResult<()> {
    if backend != Backend::Postgres || notices.is_empty() {
        return Ok(());
    }
    let tenant_id = tx.tenant_id();
    let own: Vec<Notice> = notices
        .iter()
        .filter(|notice| notice.tenant_id() == tenant_id)
        .cloned()
        .collect();
    let payloads = encode(tx.origin(), tenant_id.as_uuid(), &own);
    store::fanout::notify(tx, backend, &payloads).await
}

/// Listens for other processes' notices and publishes them on the local bus, until shutdown.
/// Returns at once on SQLite.
pub async fn run(state: AppState, mut shutdown: watch::Receiver<bool>) {
    if state.store.backend() != Backend::Postgres {
        return;
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = tokio::select! {
            connected = store::fanout::Listener::connect(&state.store) => connected,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let mut listener = match connected {
            Ok(listener) => {
                backoff = Duration::from_millis(100);
                listener
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "fan-out listener cannot connect");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        loop {
            let received = tokio::select! {
                received = listener.recv() => received,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            match received {
                Ok(Some(payload)) => receive(&state, &payload).await,
                Ok(None) => {
                    tracing::warn!("fan-out listener lost its connection; notices of other replicas sent meanwhile are lost");
                }
                Err(error) => {
                    tracing::warn!(%error, "fan-out listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// Handles one payload: ignores this process's own, loads the details of the others' and
/// publishes them.
async fn receive(state: &AppState, payload: &str) {
    let payload: Payload = match serde_json::from_str(payload) {
        Ok(payload) => payload,
        Err(error) => {
            tracing::warn!(%error, "fan-out: unreadable notification ignored");
            return;
        }
    };
    if payload.v != VERSION || payload.o == state.store.origin() {
        return;
    }
    match details(state, &payload).await {
        Ok(notices) => state.bus.publish(notices),
        Err(error) => {
            tracing::warn!(%error, tenant_id = %payload.t, "fan-out: cannot load the details of a notification")
        }
    }
}

fn from_micros(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

/// Turns a payload's ids back into notices, in the payload's order, reading the rows by id.
async fn details(state: &AppState, payload: &Payload) -> StoreResult<Vec<Notice>> {
    let tenant_id = domain::TenantId(payload.t);
    let tx = state.store.read(tenant_id).await?;
    let event_ids: Vec<Uuid> = payload
        .n
        .iter()
        .filter_map(|entry| match entry {
            Entry::Event(id) => Some(*id),
            _ => None,
        })
        .collect();
    let events: HashMap<Uuid, store::events::EventRow> = if event_ids.is_empty() {
        HashMap::new()
    } else {
        store::fanout::events_by_ids(&tx, &event_ids)
            .await?
            .into_iter()
            .map(|row| (row.id, row))
            .collect()
    };
    // History and transition rows are found by their natural key: the profile, the segment and
    // the time of the change (stored with microsecond precision).
    let mut history_profiles = BTreeSet::new();
    let mut stage_profiles = BTreeSet::new();
    let mut times: Vec<i64> = Vec::new();
    for entry in &payload.n {
        match entry {
            Entry::Segment(_, profile_id, _, at) => {
                history_profiles.insert(*profile_id);
                times.push(*at);
            }
            Entry::Stage(profile_id, at) => {
                stage_profiles.insert(*profile_id);
                times.push(*at);
            }
            _ => {}
        }
    }
    let (from, to) = match (times.iter().min(), times.iter().max()) {
        (Some(min), Some(max)) => (from_micros(min - 1_000), from_micros(max + 1_000)),
        _ => (Utc::now(), Utc::now()),
    };
    let mut history: BTreeMap<(Uuid, Uuid, bool), Vec<store::fanout::HistoryRow>> = BTreeMap::new();
    if !history_profiles.is_empty() {
        for row in store::fanout::history_between(&tx, &history_profiles, from, to).await? {
            history
                .entry((row.segment_id, row.profile_id, row.entered))
                .or_default()
                .push(row);
        }
    }
    let mut transitions: BTreeMap<Uuid, Vec<store::fanout::TransitionRow>> = BTreeMap::new();
    if !stage_profiles.is_empty() {
        for row in store::fanout::transitions_between(&tx, &stage_profiles, from, to).await? {
            transitions.entry(row.profile_id).or_default().push(row);
        }
    }
    drop(tx);
    let near = |stored: DateTime<Utc>, at: i64| (stored.timestamp_micros() - at).abs() <= 1_000;
    let mut notices = Vec::with_capacity(payload.n.len());
    for entry in &payload.n {
        match entry {
            Entry::Profile(profile_id, kind, into) => {
                let kind = match (kind, into) {
                    ('C', _) => ProfileChangeKind::Created,
                    ('M', Some(into)) => ProfileChangeKind::Merged { into: *into },
                    ('E', _) => ProfileChangeKind::Erased,
                    _ => ProfileChangeKind::Updated,
                };
                notices.push(Notice::ProfileChanged {
                    tenant_id,
                    profile_id: *profile_id,
                    kind,
                });
            }
            Entry::Event(event_id) => {
                if let Some(row) = events.get(event_id) {
                    notices.push(Notice::EventIngested {
                        tenant_id,
                        event_id: row.id,
                        profile_id: row.profile_id,
                        name: row.name.clone(),
                    });
                }
            }
            Entry::Segment(segment_id, profile_id, entered, at) => {
                let found = history
                    .get(&(*segment_id, *profile_id, *entered))
                    .and_then(|rows| rows.iter().find(|row| near(row.at, *at)));
                if let Some(row) = found {
                    notices.push(Notice::SegmentMembership {
                        tenant_id,
                        segment_id: row.segment_id,
                        profile_id: row.profile_id,
                        entered: row.entered,
                        at: row.at,
                        reason: row.reason.clone(),
                    });
                }
            }
            Entry::Stage(profile_id, at) => {
                let found = transitions
                    .get(profile_id)
                    .and_then(|rows| rows.iter().find(|row| near(row.at, *at)));
                if let Some(row) = found {
                    notices.push(Notice::StageTransition {
                        tenant_id,
                        profile_id: row.profile_id,
                        from: row.from_stage.clone(),
                        to: Some(row.to_stage.clone()),
                        at: row.at,
                        reason: row.reason.clone(),
                    });
                }
            }
            Entry::Delivery(delivery_id, campaign_id, status) => {
                notices.push(Notice::EmailDelivery {
                    tenant_id,
                    delivery_id: *delivery_id,
                    campaign_id: *campaign_id,
                    status: crate::store::campaigns::delivery_status(status),
                })
            }
        }
    }
    Ok(notices)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notices(count: usize) -> Vec<Notice> {
        let tenant_id = domain::TenantId(Uuid::now_v7());
        (0..count)
            .flat_map(|_| {
                [
                    Notice::EventIngested {
                        tenant_id,
                        event_id: Uuid::now_v7(),
                        profile_id: Uuid::now_v7(),
                        name: Some("Order Completed".to_owned()),
                    },
                    Notice::SegmentMembership {
                        tenant_id,
                        segment_id: Uuid::now_v7(),
                        profile_id: Uuid::now_v7(),
                        entered: true,
                        at: Utc::now(),
                        reason: "a long reason that is not sent".repeat(10),
                    },
                ]
            })
            .collect()
    }

    #[test]
    fn payloads_stay_under_the_limit_and_keep_every_entry_in_order() {
        let notices = notices(400);
        let origin = Uuid::now_v7();
        let tenant = Uuid::now_v7();
        let payloads = encode(origin, tenant, &notices);
        assert!(payloads.len() > 1, "800 entries need several payloads");
        let mut entries = Vec::new();
        for payload in &payloads {
            assert!(payload.len() <= MAX_PAYLOAD, "{} bytes", payload.len());
            let decoded: Payload = serde_json::from_str(payload).unwrap();
            assert_eq!((decoded.v, decoded.o, decoded.t), (VERSION, origin, tenant));
            entries.extend(decoded.n);
        }
        let expected: Vec<Entry> = notices.iter().filter_map(entry_of).collect();
        assert_eq!(entries, expected);
    }

    #[test]
    fn nothing_to_announce_sends_nothing() {
        assert!(encode(Uuid::nil(), Uuid::nil(), &[]).is_empty());
    }
}
