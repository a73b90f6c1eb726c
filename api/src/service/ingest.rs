//! The one write path of customer data: the HTTP collection API, the GraphQL `identify` and
//! `track` mutations and `cdp import` all come through [`ingest`].
//!
//! A batch is parsed and cleaned first (pure, in `domain`), then applied in one tenant
//! transaction: duplicates are skipped by message id, identities are resolved against the
//! profiles the batch touches (locked on PostgreSQL), merges and conflicts are recorded in the
//! ledger, traits merge by timestamp, and everything is written with a few multi-row statements.
//! The caller acknowledges only after the commit. A concurrent batch that linked the same new
//! identifier first makes this one retry, so that one identifier never makes two profiles.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use domain::identity::{IdentityGraph, IdentityKey, ProfileNode, ANONYMOUS_ID, USER_ID};
use domain::ingest::{
    parse_message, Channel, Envelope, Message, MessageType, RejectedMessage, Rejection,
};
use domain::traits::{self, Stamp};
use serde_json::{json, Map, Value};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::vault::Sealer;
use super::{privacy, settings, AppState, ServiceError, ServiceResult};
use crate::metrics::IngestRetry;
use crate::store::ingest::{
    ConsentRow, EventRow, GroupRow, IdentityRow, LedgerRow, ProfileRow, Race, WriteSet,
};
use crate::store::{self, StoreError, TenantTx};

/// Where data comes from: an api key (a named source with a channel), or a signed-in user.
#[derive(Debug, Clone)]
pub struct Source {
    pub key_id: Option<Uuid>,
    pub channel: Channel,
}

impl Source {
    /// The id the per-source counts are kept under; data sent by users (GraphQL, import) counts
    /// under the nil id.
    fn stats_id(&self) -> Uuid {
        self.key_id.unwrap_or(Uuid::nil())
    }
}

/// One request's messages and the batch-level fields that apply to all of them.
#[derive(Debug, Clone)]
pub struct Batch {
    pub messages: Vec<Value>,
    pub sent_at: Option<Value>,
    pub context: Option<Value>,
    pub received_at: DateTime<Utc>,
}

/// What became of one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Accepted { profile_id: Uuid, event_id: Uuid },
    Duplicate,
    Rejected(Rejection),
}

#[derive(Debug, Clone)]
pub struct MessageReport {
    pub index: usize,
    pub message_id: Option<String>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Default)]
pub struct IngestReport {
    pub messages: Vec<MessageReport>,
}

impl IngestReport {
    pub fn count(&self, predicate: impl Fn(&Outcome) -> bool) -> usize {
        self.messages
            .iter()
            .filter(|report| predicate(&report.outcome))
            .count()
    }
    pub fn accepted(&self) -> usize {
        self.count(|outcome| matches!(outcome, Outcome::Accepted { .. }))
    }
    pub fn duplicates(&self) -> usize {
        self.count(|outcome| matches!(outcome, Outcome::Duplicate))
    }
    pub fn rejected(&self) -> impl Iterator<Item = &MessageReport> {
        self.messages
            .iter()
            .filter(|report| matches!(report.outcome, Outcome::Rejected(_)))
    }
}

/// Ingests a batch for a tenant. Returns once everything accepted is committed.
pub async fn ingest(
    state: &AppState,
    tenant_id: domain::TenantId,
    source: &Source,
    batch: Batch,
) -> ServiceResult<IngestReport> {
    let settings = settings::load_cached(state, tenant_id).await?;
    ingest_with(state, tenant_id, source, batch, &settings).await
}

/// [`ingest`] with the tenant's settings already loaded.
#[tracing::instrument(skip_all, fields(tenant_id = %tenant_id, messages = batch.messages.len()))]
pub async fn ingest_with(
    state: &AppState,
    tenant_id: domain::TenantId,
    source: &Source,
    batch: Batch,
    settings: &settings::IngestSettings,
) -> ServiceResult<IngestReport> {
    let options = settings.parse_options();
    let Batch {
        messages,
        sent_at,
        context,
        received_at,
    } = batch;
    // Each message is taken apart into the parsed one (nothing of it is copied); a rejected one
    // keeps only its id.
    let parsed: Vec<Parsed> = messages
        .into_iter()
        .map(|raw| {
            let envelope = Envelope {
                received_at,
                batch_sent_at: sent_at.as_ref(),
                batch_context: context.as_ref(),
                generated_message_id: Uuid::now_v7().to_string(),
            };
            parse_message(raw, &envelope, &options)
        })
        .collect();
    let pending = Pending {
        source: source.clone(),
        received_at,
        parsed,
        rules: settings.identity_rules.clone(),
        reply: None,
    };
    let grouped = state
        .config
        .ingest_group_commit
        .unwrap_or(state.store.backend() == store::Backend::Sqlite);
    let report = if grouped {
        state.group_commit.submit(state, tenant_id, pending).await
    } else {
        commit_group(state, tenant_id, std::slice::from_ref(&pending))
            .await
            .map(|mut reports| reports.remove(0))
    }?;
    let rejected: Vec<&str> = report
        .messages
        .iter()
        .filter_map(|message| match &message.outcome {
            Outcome::Rejected(rejection) => Some(rejection.code),
            _ => None,
        })
        .collect();
    state
        .metrics
        .ingested(report.accepted(), report.duplicates(), &rejected);
    Ok(report)
}

/// Per-tenant group commit: one writer task per tenant and process takes every request that is
/// waiting and writes them in one transaction, then answers each with its own report. Requests of
/// one tenant thus never contend for the same rows inside a process, and a commit (and its disk
/// flush) is shared by everything that arrived meanwhile. A request is still acknowledged only
/// after the commit that holds it. Several processes still write concurrently; the locks of the
/// write path keep that correct.
#[derive(Default)]
pub struct GroupCommit {
    /// (tenant, writer slot) → the writer's queue.
    writers: Mutex<HashMap<(domain::TenantId, usize), mpsc::Sender<Pending>>>,
    /// Spreads requests over a tenant's writers, round robin.
    next: std::sync::atomic::AtomicUsize,
}

/// Messages one group takes at most (it always takes at least one request).
const MAX_GROUP_MESSAGES: usize = 2_000;
/// Requests that may wait for a tenant's writer before callers wait to enqueue.
const WRITER_QUEUE: usize = 256;
/// A writer with nothing to do for this long ends (the next request starts a new one).
const WRITER_IDLE: Duration = Duration::from_secs(30);

/// One message of a request, parsed.
type Parsed = Result<Message, RejectedMessage>;

/// One request waiting for its group.
pub struct Pending {
    source: Source,
    received_at: DateTime<Utc>,
    parsed: Vec<Parsed>,
    rules: domain::identity::IdentityRules,
    reply: Option<oneshot::Sender<ServiceResult<IngestReport>>>,
}

impl GroupCommit {
    async fn submit(
        &self,
        state: &AppState,
        tenant_id: domain::TenantId,
        mut pending: Pending,
    ) -> ServiceResult<IngestReport> {
        let (reply, answer) = oneshot::channel();
        pending.reply = Some(reply);
        let slots = state.config.ingest_writers_per_tenant.max(1);
        let slot = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % slots;
        loop {
            let sender = self.writer(state, (tenant_id, slot));
            match sender.send(pending).await {
                Ok(()) => break,
                // That writer was ending: start another one.
                Err(mpsc::error::SendError(returned)) => {
                    pending = returned;
                    self.forget((tenant_id, slot), &sender);
                }
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(ServiceError::Unexpected(anyhow::anyhow!(
                "the ingest writer stopped before answering"
            )))
        })
    }

    fn writer(&self, state: &AppState, key: (domain::TenantId, usize)) -> mpsc::Sender<Pending> {
        let mut writers = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(sender) = writers.get(&key) {
            if !sender.is_closed() {
                return sender.clone();
            }
        }
        let (sender, receiver) = mpsc::channel(WRITER_QUEUE);
        writers.insert(key, sender.clone());
        tokio::spawn(run_writer(state.clone(), key.0, receiver));
        sender
    }

    fn forget(&self, key: (domain::TenantId, usize), ended: &mpsc::Sender<Pending>) {
        let mut writers = self
            .writers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if writers
            .get(&key)
            .is_some_and(|sender| sender.same_channel(ended))
        {
            writers.remove(&key);
        }
    }
}

/// A tenant's writer: takes what is waiting, writes it as one group, answers, and ends when idle.
async fn run_writer(
    state: AppState,
    tenant_id: domain::TenantId,
    mut receiver: mpsc::Receiver<Pending>,
) {
    loop {
        let first = match tokio::time::timeout(WRITER_IDLE, receiver.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) => return,
            Err(_) => {
                // Idle: refuse new requests (their callers start a new writer), then finish what
                // arrived meanwhile.
                receiver.close();
                let mut rest = Vec::new();
                while let Some(pending) = receiver.recv().await {
                    rest.push(pending);
                }
                if !rest.is_empty() {
                    write_group(&state, tenant_id, rest).await;
                }
                return;
            }
        };
        let mut group = vec![first];
        let mut messages = group[0].parsed.len();
        while messages < MAX_GROUP_MESSAGES {
            match receiver.try_recv() {
                Ok(pending) => {
                    messages += pending.parsed.len();
                    group.push(pending);
                }
                Err(_) => break,
            }
        }
        write_group(&state, tenant_id, group).await;
    }
}

/// Writes a group and answers every request in it. If the group as a whole fails, each request
/// is tried alone, so that one request's failure is only its own.
async fn write_group(state: &AppState, tenant_id: domain::TenantId, mut group: Vec<Pending>) {
    let result = commit_group(state, tenant_id, &group).await;
    match result {
        Ok(reports) => {
            for (pending, report) in group.iter_mut().zip(reports) {
                if let Some(reply) = pending.reply.take() {
                    let _ = reply.send(Ok(report));
                }
            }
        }
        Err(error) if group.len() == 1 => {
            if let Some(reply) = group[0].reply.take() {
                let _ = reply.send(Err(error));
            }
        }
        Err(error) => {
            tracing::warn!(error = %error, requests = group.len(), "ingest group failed; writing its requests one by one");
            for pending in &mut group {
                let alone = commit_group(state, tenant_id, std::slice::from_ref(pending))
                    .await
                    .map(|mut reports| reports.remove(0));
                if let Some(reply) = pending.reply.take() {
                    let _ = reply.send(alone);
                }
            }
        }
    }
}

/// One transaction for a group of requests, begun again after a conflict or a transient failure
/// (counted in `cdp_ingest_retries_total`). Publishes the group's notices after the commit.
async fn commit_group(
    state: &AppState,
    tenant_id: domain::TenantId,
    group: &[Pending],
) -> ServiceResult<Vec<IngestReport>> {
    let jobs: Vec<Job<'_>> = group
        .iter()
        .map(|pending| Job {
            source: &pending.source,
            received_at: pending.received_at,
            parsed: &pending.parsed,
        })
        .collect();
    let rules = &group[0].rules;
    let mut attempt: u64 = 0;
    // Whether `apply` looks up stored message ids first: not until a conflict says it must.
    let mut look_up_stored = false;
    loop {
        let error = match attempt_group(state, tenant_id, rules, &jobs, look_up_stored).await {
            Ok(reports) => return Ok(reports),
            Err(error) if attempt >= MAX_RETRIES => return Err(error.into()),
            Err(error) => error,
        };
        // Why the group begins again, and whether at once: what it met has committed, so the
        // retry sees it; or a concurrent group may still be running, so it backs off.
        let (reason, at_once) = match error {
            StoreError::Raced(Race::MessageStored) if !look_up_stored => {
                // Most likely a message sent again: the retry looks stored messages up.
                look_up_stored = true;
                (IngestRetry::StoredMessage, true)
            }
            // This group waited for the merge's lock, so the merge has committed: the retry's
            // lookup finds the survivor.
            StoreError::Raced(Race::ProfileMerged) => (IngestRetry::ProfileMerged, true),
            // An identifier, message or profile key written concurrently.
            StoreError::Raced(_) | StoreError::Conflict(_) => (IngestRetry::Conflict, false),
            error if error.is_retryable() => (IngestRetry::Transient, false),
            error => return Err(error.into()),
        };
        attempt += 1;
        state.metrics.ingest_retry(reason);
        tracing::debug!(attempt, reason = reason.label(), "ingest group begun again");
        if !at_once {
            // Back off a little, with jitter, so that colliding groups do not collide again.
            let jitter = rand::random::<u64>() % 20;
            tokio::time::sleep(Duration::from_millis(5 * attempt + jitter)).await;
        }
    }
}

/// Times a group is begun again at most; the error of the attempt after that is the answer.
const MAX_RETRIES: u64 = 8;

/// One attempt at a group: its transaction begun, applied and committed (rolled back when it
/// fails), then the group's notices published.
async fn attempt_group(
    state: &AppState,
    tenant_id: domain::TenantId,
    rules: &domain::identity::IdentityRules,
    jobs: &[Job<'_>],
    look_up_stored: bool,
) -> Result<Vec<IngestReport>, StoreError> {
    let tx = state.store.begin_writing(tenant_id).await?;
    let (reports, notices) = apply(state, &tx, rules, jobs, look_up_stored).await?;
    tx.commit().await?;
    state.bus.publish(notices);
    compact_stats_now_and_then(state, tenant_id).await;
    Ok(reports)
}

/// One request's share of a group.
struct Job<'a> {
    source: &'a Source,
    received_at: DateTime<Utc>,
    parsed: &'a [Parsed],
}

/// How often this process folds a tenant's appended count deltas into its per-source counts.
const STATS_COMPACTION_INTERVAL: Duration = Duration::from_secs(10);

/// When this process last folded each tenant's count deltas.
static LAST_STATS_COMPACTION: Mutex<Option<HashMap<Uuid, Instant>>> = Mutex::new(None);

/// Folds the tenant's count deltas into the per-source counts when the last fold is older than
/// [`STATS_COMPACTION_INTERVAL`], in a transaction of its own after the batch's commit, so that
/// batches never wait on the counts. A failure is logged and changes nothing: the deltas stay,
/// and readers count them.
async fn compact_stats_now_and_then(state: &AppState, tenant_id: domain::TenantId) {
    let now = Instant::now();
    let due = {
        // The map holds plain instants, so a panic elsewhere cannot leave it inconsistent.
        let mut guard = LAST_STATS_COMPACTION
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let last = guard.get_or_insert_with(HashMap::new);
        match last.get(&tenant_id.as_uuid()) {
            Some(at) if now.duration_since(*at) < STATS_COMPACTION_INTERVAL => false,
            _ => {
                last.insert(tenant_id.as_uuid(), now);
                true
            }
        }
    };
    if !due {
        return;
    }
    let result = async {
        let tx = state.store.begin(tenant_id).await?;
        store::ingest::compact_stats(&tx).await?;
        tx.commit().await
    }
    .await;
    if let Err(error) = result {
        tracing::warn!(%tenant_id, error = ?error, "folding the ingestion counts failed; retrying later");
    }
}

/// A profile being changed by this batch.
struct Working {
    row: ProfileRow,
    changed: bool,
}

/// Everything the batch builds up before writing.
struct Work<'a> {
    tenant_id: Uuid,
    /// Seals personal data under the data key of the profile it lands on.
    sealer: Sealer,
    /// Plain value of each identifier of the batch, by its blind index: sealed into the identity
    /// rows and the ledger, never stored as it is.
    displays: HashMap<String, String>,
    /// Blind index of each identifier value of the batch, computed once per value.
    lookups: HashMap<String, String>,
    /// Identifiers (kind, blind index) suppressed by an erasure: never linked again.
    suppressed: HashSet<(String, String)>,
    consent_changes: Vec<store::keys::ConsentChangeRow>,
    now: DateTime<Utc>,
    source: &'a Source,
    rules: &'a domain::identity::IdentityRules,
    graph: IdentityGraph,
    profiles: HashMap<Uuid, Working>,
    redirect: HashMap<Uuid, Uuid>,
    consents: HashMap<(Uuid, String), ConsentRow>,
    changed_consents: BTreeSet<(Uuid, String)>,
    groups: HashMap<String, GroupRow>,
    changed_groups: BTreeSet<String>,
    profile_groups: Vec<(Uuid, String, DateTime<Utc>)>,
    new_identities: Vec<(IdentityKey, String, String)>,
    events: Vec<EventRow>,
    merges: Vec<(Uuid, Uuid)>,
    ledger: Vec<LedgerRow>,
    /// (source stats id, outcome) → count.
    stats: HashMap<(Uuid, String), i64>,
}

impl Work<'_> {
    /// The blind index of an identifier value (the same for every kind), computed once per
    /// value and batch.
    fn lookup(&mut self, value: &str) -> String {
        if let Some(lookup) = self.lookups.get(value) {
            return lookup.clone();
        }
        let lookup = self.sealer.tenant().identity_lookup(value);
        self.lookups.insert(value.to_owned(), lookup.clone());
        lookup
    }

    fn final_id(&self, mut id: Uuid) -> Uuid {
        while let Some(next) = self.redirect.get(&id) {
            id = *next;
        }
        id
    }

    fn count(&mut self, outcome: impl Into<String>) {
        *self
            .stats
            .entry((self.source.stats_id(), outcome.into()))
            .or_default() += 1;
    }

    fn ledger(
        &mut self,
        action: &str,
        profile_id: Uuid,
        other: Option<Uuid>,
        message_id: &str,
        identity: Option<&IdentityKey>,
        rule: &str,
    ) {
        // The ledger names the identifier by its sealed value, under the data key of the
        // profile the entry is about, so that erasing that profile shreds it.
        let identity_value = identity.map(|identity| {
            let plain = self
                .displays
                .get(&identity.value)
                .cloned()
                .unwrap_or_default();
            self.sealer.seal_text(profile_id, &plain)
        });
        self.ledger.push(LedgerRow {
            tenant_id: self.tenant_id,
            id: Uuid::now_v7(),
            at: self.now,
            action: action.to_owned(),
            profile_id,
            other_profile_id: other,
            message_id: Some(message_id.to_owned()),
            identity_kind: identity.map(|identity| identity.kind.clone()),
            identity_value,
            rule: rule.to_owned(),
            detail: None,
        });
    }

    /// Folds `merged` into `survivor` in memory: traits per key by timestamp, counts, seen
    /// times, channels and consents.
    fn merge(&mut self, survivor: Uuid, merged: Uuid) {
        let Some(mut gone) = self.profiles.remove(&merged) else {
            return;
        };
        if let Some(target) = self.profiles.get_mut(&survivor) {
            fold_profile(&mut target.row, &gone.row);
            target.changed = true;
        }
        let moved: Vec<(Uuid, String)> = self
            .consents
            .keys()
            .filter(|(id, _)| *id == merged)
            .cloned()
            .collect();
        for key in moved {
            if let Some(mut consent) = self.consents.remove(&key) {
                let survivor_key = (survivor, key.1.clone());
                let newer = self
                    .consents
                    .get(&survivor_key)
                    .is_none_or(|existing| consent.updated_at > existing.updated_at);
                if newer {
                    consent.profile_id = survivor;
                    self.consents.insert(survivor_key.clone(), consent);
                    self.changed_consents.insert(survivor_key);
                }
            }
            self.changed_consents.remove(&key);
        }
        gone.row.merged_into = Some(survivor);
        gone.changed = true;
        self.redirect.insert(merged, survivor);
        self.merges.push((merged, survivor));
        // Keep the tombstone so that the merged id keeps resolving.
        self.profiles.insert(merged, gone);
    }
}

/// Folds a merged profile's derived state into its survivor: traits per key by timestamp, event
/// counts, first and last seen, the earlier creation time, and the union of channels. Used by
/// automatic merges here and by manual merges in `profiles`.
pub(crate) fn fold_profile(survivor: &mut ProfileRow, merged: &ProfileRow) {
    let mut traits_map = survivor.traits.as_object().cloned().unwrap_or_default();
    let mut clock = survivor
        .trait_clock
        .as_object()
        .cloned()
        .unwrap_or_default();
    traits::merge(
        &mut traits_map,
        &mut clock,
        merged.traits.as_object().unwrap_or(&Map::new()),
        merged.trait_clock.as_object().unwrap_or(&Map::new()),
    );
    survivor.traits = Value::Object(traits_map);
    survivor.trait_clock = Value::Object(clock);
    survivor.event_count += merged.event_count;
    survivor.first_seen_at = survivor.first_seen_at.min(merged.first_seen_at);
    survivor.last_seen_at = survivor.last_seen_at.max(merged.last_seen_at);
    survivor.created_at = survivor.created_at.min(merged.created_at);
    survivor.channels = union_channels(&survivor.channels, &merged.channels);
}

/// The object `value` holds, taken out of it (an empty one if it holds something else); `value`
/// is left `null` until the caller puts the object back.
fn take_object(value: &mut Value) -> Map<String, Value> {
    match std::mem::take(value) {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

fn union_channels(a: &Value, b: &Value) -> Value {
    let mut set: BTreeSet<String> = BTreeSet::new();
    for value in [a, b] {
        if let Some(items) = value.as_array() {
            set.extend(items.iter().filter_map(Value::as_str).map(str::to_owned));
        }
    }
    json!(set)
}

async fn apply<'a>(
    state: &AppState,
    tx: &TenantTx,
    rules: &'a domain::identity::IdentityRules,
    jobs: &[Job<'a>],
    look_up_stored: bool,
) -> Result<(Vec<IngestReport>, Vec<super::bus::Notice>), StoreError> {
    let now = state.now();
    // The tenant's row, read once under the segment barrier that `begin_writing` took (shared;
    // a change of the personal keys takes it exclusively while it re-seals), so that a batch
    // seals exactly what the committed settings say, never with keys that changed meanwhile:
    // its privacy settings, and the version of its definitions (segments, lifecycle model,
    // campaigns, webhooks), which this process may hold already.
    let tenant = store::tenants::get(tx).await?;
    let pii = &privacy::settings_of(&tenant).pii_keys();
    let definitions = super::definitions::at(tx, tenant.definitions_version).await?;
    let all_parsed = || jobs.iter().flat_map(|job| job.parsed.iter());
    let mut work = Work {
        tenant_id: tx.tenant_id().as_uuid(),
        sealer: state.vault.sealer(tx, pii.clone(), &[]).await?,
        displays: HashMap::new(),
        lookups: HashMap::new(),
        suppressed: HashSet::new(),
        consent_changes: Vec::new(),
        now,
        source: jobs[0].source,
        rules,
        graph: IdentityGraph::default(),
        profiles: HashMap::new(),
        redirect: HashMap::new(),
        consents: HashMap::new(),
        changed_consents: BTreeSet::new(),
        groups: HashMap::new(),
        changed_groups: BTreeSet::new(),
        profile_groups: Vec::new(),
        new_identities: Vec::new(),
        events: Vec::new(),
        merges: Vec::new(),
        ledger: Vec::new(),
        stats: HashMap::new(),
    };

    // Everything the batch's identities touch, loaded at once.
    let mut keys: BTreeSet<(String, String)> = BTreeSet::new();
    // Identifiers are looked up and stored by their blind index only.
    for message in all_parsed().flatten() {
        for identity in &message.identities {
            let lookup = work.lookup(&identity.key.value);
            work.displays
                .entry(lookup.clone())
                .or_insert_with(|| identity.display.clone());
            keys.insert((identity.key.kind.clone(), lookup));
        }
        if let Some(previous) = &message.previous_id {
            let lookup = work.lookup(previous);
            work.displays
                .entry(lookup.clone())
                .or_insert_with(|| previous.clone());
            keys.insert((USER_ID.to_owned(), lookup.clone()));
            keys.insert((ANONYMOUS_ID.to_owned(), lookup));
        }
    }
    let keys: Vec<(String, String)> = keys.into_iter().collect();
    let backend = state.store.backend();
    let mut owned = store::ingest::identities_by_keys(tx, backend, &keys).await?;
    // Identifiers nobody holds yet are locked (on PostgreSQL), so that two batches carrying the
    // same new identifier do not both create a profile for it; the second one waits and then
    // finds the first one's. Identifiers already held resolve to profiles that are locked below.
    let known: HashSet<(&str, &str)> = owned
        .iter()
        .map(|row| (row.kind.as_str(), row.lookup.as_str()))
        .collect();
    let unknown: Vec<(String, String)> = keys
        .iter()
        .filter(|(kind, lookup)| !known.contains(&(kind.as_str(), lookup.as_str())))
        .cloned()
        .collect();
    if store::ingest::lock_identities(tx, backend, &unknown).await? {
        owned.extend(store::ingest::identities_by_keys(tx, backend, &unknown).await?);
    }
    let owner_ids: BTreeSet<Uuid> = owned.iter().map(|row| row.profile_id).collect();
    let rows = store::profiles::load(tx, backend, &owner_ids, true).await?;
    // An owner found merged away once locked: a concurrent batch merged it after the lookup
    // above and moved its identifiers to a survivor this batch has not locked (identities never
    // point at a merged profile otherwise). Resolving now would take them for new ones and fail
    // on their keys at the end; the batch begins again at once instead.
    if rows.iter().any(|row| row.merged_into.is_some()) {
        return Err(StoreError::Raced(Race::ProfileMerged));
    }
    // Duplicates: stored before, or earlier in this batch. Stored ones are looked up only when
    // asked: a first attempt assumes none (the common case) and the events' unique message ids
    // fail it with a conflict when one was, and the retry looks them up. Looked up under the
    // locks of every identifier and profile the batch touches, so that a concurrent retry of the
    // same batch is seen once it commits.
    let stored: HashSet<String> = if look_up_stored {
        let message_ids: Vec<String> = all_parsed()
            .flatten()
            .map(|message| message.message_id.clone())
            .collect();
        store::events::existing_message_ids(tx, state.store.events_partitioned(), &message_ids)
            .await?
            .into_iter()
            .collect()
    } else {
        HashSet::new()
    };
    let owner_list: Vec<Uuid> = owner_ids.iter().copied().collect();
    work.sealer = state.vault.sealer(tx, pii.clone(), &owner_list).await?;
    // Read after the profiles' locks: an erasure that held them has committed its suppressions.
    work.suppressed = store::keys::suppressed(tx, &keys)
        .await?
        .into_iter()
        .collect();
    let mut identities_by_profile: HashMap<Uuid, BTreeSet<IdentityKey>> = HashMap::new();
    for (profile_id, kind, lookup) in store::ingest::identity_keys_of(tx, &owner_list).await? {
        identities_by_profile
            .entry(profile_id)
            .or_default()
            .insert(IdentityKey::new(kind, lookup));
    }
    for consent in store::profiles::consents_of(tx, &owner_list).await? {
        work.consents
            .insert((consent.profile_id, consent.purpose.clone()), consent);
    }
    let group_ids: Vec<String> = all_parsed()
        .flatten()
        .filter_map(|message| message.group_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for group in store::profiles::groups_by_ids(tx, &group_ids).await? {
        work.groups.insert(group.group_id.clone(), group);
    }
    for row in rows {
        let identities = identities_by_profile.remove(&row.id).unwrap_or_default();
        work.graph.insert_profile(
            row.id,
            ProfileNode {
                created_at: row.created_at,
                identities,
            },
        );
        work.profiles.insert(
            row.id,
            Working {
                row,
                changed: false,
            },
        );
    }
    let known_user_ids: HashSet<String> = owned
        .iter()
        .filter(|row| row.kind == USER_ID)
        .map(|row| row.lookup.clone())
        .collect();

    let mut reports: Vec<IngestReport> = Vec::with_capacity(jobs.len());
    // Across the whole group: a message id sent twice is stored once.
    let mut seen_in_batch: HashSet<String> = HashSet::new();
    for job in jobs {
        work.source = job.source;
        let mut report = IngestReport::default();
        for (index, result) in job.parsed.iter().enumerate() {
            let message = match result {
                Ok(message) => message,
                Err(RejectedMessage {
                    rejection,
                    message_id,
                }) => {
                    work.count(format!("rejected:{}", rejection.code));
                    report.messages.push(MessageReport {
                        index,
                        message_id: message_id.clone(),
                        outcome: Outcome::Rejected(rejection.clone()),
                    });
                    continue;
                }
            };
            if stored.contains(&message.message_id)
                || !seen_in_batch.insert(message.message_id.clone())
            {
                work.count("duplicate");
                report.messages.push(MessageReport {
                    index,
                    message_id: Some(message.message_id.clone()),
                    outcome: Outcome::Duplicate,
                });
                continue;
            }
            match apply_message(&mut work, message, &known_user_ids, job.received_at) {
                Ok((profile_id, event_id)) => {
                    work.count("accepted");
                    // Warnings are reported for the messages that were stored.
                    for warning in &message.warnings {
                        work.count(format!("warning:{warning}"));
                    }
                    report.messages.push(MessageReport {
                        index,
                        message_id: Some(message.message_id.clone()),
                        outcome: Outcome::Accepted {
                            profile_id,
                            event_id,
                        },
                    });
                }
                Err(rejection) => {
                    work.count(format!("rejected:{}", rejection.code));
                    report.messages.push(MessageReport {
                        index,
                        message_id: Some(message.message_id.clone()),
                        outcome: Outcome::Rejected(rejection),
                    });
                }
            }
        }

        reports.push(report);
    }

    // Resolve every row to its final profile, then write.
    for report in &mut reports {
        for message in &mut report.messages {
            if let Outcome::Accepted { profile_id, .. } = &mut message.outcome {
                *profile_id = work.final_id(*profile_id);
            }
        }
    }
    let mut set = WriteSet::default();
    for (_, working) in work.profiles.drain() {
        if working.changed {
            set.profiles.push(working.row);
        }
    }
    set.profiles.sort_by_key(|row| row.id);
    set.merges = work.merges.clone();
    for (key, display, message_id) in &work.new_identities {
        let Some(owner) = work.graph.owner(key) else {
            continue;
        };
        let sealed = work.sealer.seal_text(owner, display);
        set.identities.push(IdentityRow {
            tenant_id: work.tenant_id,
            kind: key.kind.clone(),
            lookup: key.value.clone(),
            value: sealed,
            profile_id: owner,
            message_id: Some(message_id.clone()),
            created_at: now,
        });
    }
    for mut event in std::mem::take(&mut work.events) {
        event.profile_id = work.final_id(event.profile_id);
        set.events.push(event);
    }
    for key in &work.changed_consents {
        if let Some(consent) = work.consents.get(key) {
            let mut consent = consent.clone();
            consent.profile_id = work.final_id(consent.profile_id);
            set.consents.push(consent);
        }
    }
    for group_id in &work.changed_groups {
        if let Some(group) = work.groups.get(group_id) {
            set.groups.push(group.clone());
        }
    }
    let mut memberships: BTreeSet<(Uuid, String)> = BTreeSet::new();
    for (profile_id, group_id, joined_at) in &work.profile_groups {
        let profile_id = work.final_id(*profile_id);
        if memberships.insert((profile_id, group_id.clone())) {
            set.profile_groups
                .push((profile_id, group_id.clone(), *joined_at));
        }
    }
    let mut consent_changes = std::mem::take(&mut work.consent_changes);
    for change in &mut consent_changes {
        change.profile_id = work.final_id(change.profile_id);
    }
    set.consent_changes = consent_changes;
    set.ledger = std::mem::take(&mut work.ledger);
    for row in &mut set.ledger {
        row.profile_id = work.final_id(row.profile_id);
    }
    let mut stats: Vec<(Uuid, String, i64)> = work
        .stats
        .into_iter()
        .map(|((source, outcome), count)| (source, outcome, count))
        .collect();
    stats.sort();
    set.stats = stats;
    let mut understanding = Understanding::of(&set, jobs, &reports, &owner_ids);
    // The orders ride on their profiles' upserts.
    set.orders = std::mem::take(&mut understanding.orders);
    // So do the stages of the profiles the batch creates: decided from the batch, which holds
    // all there is of them, and written with their first row instead of a second row version.
    let born = born_stages(&set, &understanding.deltas, &definitions.model, now);
    set.stages = born
        .iter()
        .filter_map(|change| Some((change.profile_id, change.to.clone()?)))
        .collect();
    work.sealer.save(tx, now).await?;
    store::ingest::apply(tx, set, now).await?;
    store::lifecycle::record_transitions(tx, &born, now).await?;
    // Every write of the batch is done and the transaction is still open: the stage and the
    // segments of the profiles it changed are decided here, in the same transaction.
    for (merged, survivor) in &understanding.merges {
        store::lifecycle::fold_order_totals(tx, *merged, *survivor).await?;
    }
    let mut notices = understanding.data_notices(tx.tenant_id());
    notices.extend(
        born.into_iter()
            .map(|change| super::understand::stage_notice(tx.tenant_id(), change, now)),
    );
    // The born profiles' stages are stored: evaluated again, they stay, and only their segments
    // change.
    notices.extend(
        super::understand::after_write(
            tx,
            state.store.backend(),
            Some(&definitions),
            &understanding.deltas,
            &understanding.merges,
            now,
        )
        .await?,
    );
    let reactions =
        super::reactions::react(tx, state.store.backend(), Some(&definitions), &notices, now)
            .await?;
    notices.extend(reactions);
    Ok((reports, notices))
}

/// The lifecycle stage of each profile the batch creates (neither merged away nor absorbing
/// another), from facts made of what the batch writes of it: its row, its order totals, its
/// consents and its events. That is all such a profile has, so these are the facts
/// `store::facts::load` reads back after the write, and evaluating them there finds the same
/// stage (a stage's condition cannot read the stage).
fn born_stages(
    set: &WriteSet,
    deltas: &BTreeMap<Uuid, super::understand::Delta>,
    model: &domain::lifecycle::LifecycleModel,
    now: DateTime<Utc>,
) -> Vec<store::lifecycle::StageChange> {
    // A new profile that absorbed another one (an older profile merges into a newer one only
    // when the clocks of the writers disagree) gains stored events and totals the batch does not
    // hold: `understand::after_write` decides its stage from the database instead.
    let survivors: HashSet<Uuid> = set.merges.iter().map(|(_, survivor)| *survivor).collect();
    let born: HashMap<Uuid, &ProfileRow> = set
        .profiles
        .iter()
        .filter(|row| {
            deltas.get(&row.id).is_some_and(|delta| delta.created) && !survivors.contains(&row.id)
        })
        .map(|row| (row.id, row))
        .collect();
    if born.is_empty() || model.stages().is_empty() {
        return Vec::new();
    }
    let orders: HashMap<Uuid, (i64, f64)> = set
        .orders
        .iter()
        .map(|(id, count, revenue)| (*id, (*count, *revenue)))
        .collect();
    let mut facts: BTreeMap<Uuid, domain::condition::ProfileFacts> = born
        .iter()
        .map(|(id, row)| {
            let (order_count, total_revenue) = orders.get(id).copied().unwrap_or((0, 0.0));
            (
                *id,
                store::facts::of_new_profile(row, order_count, total_revenue),
            )
        })
        .collect();
    for consent in &set.consents {
        if let Some(profile) = facts.get_mut(&consent.profile_id) {
            profile
                .consents
                .insert(consent.purpose.clone(), consent.granted);
        }
    }
    for event in &set.events {
        if let Some(profile) = facts.get_mut(&event.profile_id) {
            profile.events.push(store::facts::event_fact(
                event.name.clone(),
                event.timestamp,
                event.properties.clone(),
            ));
        }
    }
    facts
        .into_iter()
        .filter_map(|(profile_id, profile)| {
            let to = domain::lifecycle::stage_of(model, &profile, now)?.to_owned();
            let reason = deltas
                .get(&profile_id)
                .map(super::understand::Delta::describe)
                .unwrap_or_default();
            Some(store::lifecycle::StageChange {
                profile_id,
                from: None,
                to: Some(to),
                reason,
            })
        })
        .collect()
}

/// What a batch changed, for real-time understanding: per surviving profile, what changed; the
/// merges; and the orders to add to each profile's totals.
struct Understanding {
    deltas: BTreeMap<Uuid, super::understand::Delta>,
    merges: Vec<(Uuid, Uuid)>,
    orders: Vec<(Uuid, i64, f64)>,
    /// (event id, profile id, name) of every stored event, in message order.
    events: Vec<(Uuid, Uuid, Option<String>)>,
}

impl Understanding {
    /// Notices of the profiles and events the batch wrote: merged-away profiles first, then
    /// created and updated ones, then events in message order.
    fn data_notices(&self, tenant_id: domain::TenantId) -> Vec<super::bus::Notice> {
        use super::bus::{Notice, ProfileChangeKind};
        let mut notices = Vec::new();
        for (merged, survivor) in &self.merges {
            notices.push(Notice::ProfileChanged {
                tenant_id,
                profile_id: *merged,
                kind: ProfileChangeKind::Merged { into: *survivor },
            });
        }
        for (profile_id, delta) in &self.deltas {
            notices.push(Notice::ProfileChanged {
                tenant_id,
                profile_id: *profile_id,
                kind: if delta.created {
                    ProfileChangeKind::Created
                } else {
                    ProfileChangeKind::Updated
                },
            });
        }
        for (event_id, profile_id, name) in &self.events {
            notices.push(Notice::EventIngested {
                tenant_id,
                event_id: *event_id,
                profile_id: *profile_id,
                name: name.clone(),
            });
        }
        notices
    }

    fn of(
        set: &WriteSet,
        jobs: &[Job<'_>],
        reports: &[IngestReport],
        existing: &BTreeSet<Uuid>,
    ) -> Understanding {
        use super::understand::Delta;
        let mut deltas: BTreeMap<Uuid, Delta> = BTreeMap::new();
        let mut orders: BTreeMap<Uuid, (i64, f64)> = BTreeMap::new();
        let empty = Map::new();
        for event in &set.events {
            let delta = deltas.entry(event.profile_id).or_default();
            delta.events = true;
            if let Some(name) = &event.name {
                delta.event_names.insert(name.clone());
                let properties = event.properties.as_object().unwrap_or(&empty);
                if let Some(value) = domain::analytics::order_value(name, properties) {
                    let total = orders.entry(event.profile_id).or_default();
                    total.0 += 1;
                    total.1 += value;
                }
            }
        }
        let accepted = jobs.iter().zip(reports).flat_map(|(job, report)| {
            report
                .messages
                .iter()
                .filter_map(move |message_report| match message_report.outcome {
                    Outcome::Accepted { profile_id, .. } => {
                        Some((profile_id, job.parsed.get(message_report.index)))
                    }
                    _ => None,
                })
        });
        for (profile_id, parsed) in accepted {
            if let Some(Ok(message)) = parsed {
                if message.kind == domain::ingest::MessageType::Identify {
                    deltas
                        .entry(profile_id)
                        .or_default()
                        .trait_keys
                        .extend(message.traits.keys().cloned());
                }
            }
        }
        for consent in &set.consents {
            deltas
                .entry(consent.profile_id)
                .or_default()
                .consents
                .insert(consent.purpose.clone());
        }
        for row in &set.profiles {
            if row.merged_into.is_none() && !existing.contains(&row.id) {
                let delta = deltas.entry(row.id).or_default();
                delta.everything = true;
                delta.created = true;
            }
        }
        for (_, survivor) in &set.merges {
            deltas.entry(*survivor).or_default().everything = true;
        }
        Understanding {
            deltas,
            events: set
                .events
                .iter()
                .map(|event| (event.id, event.profile_id, event.name.clone()))
                .collect(),
            merges: set.merges.clone(),
            orders: orders
                .into_iter()
                .map(|(id, (count, revenue))| (id, count, revenue))
                .collect(),
        }
    }
}

/// Applies one clean, new message to the working set. Returns (profile, event).
fn apply_message(
    work: &mut Work<'_>,
    message: &Message,
    known_user_ids: &HashSet<String>,
    received_at: DateTime<Utc>,
) -> Result<(Uuid, Uuid), Rejection> {
    // Identifiers by their blind index.
    let mut keys: Vec<IdentityKey> = message
        .identities
        .iter()
        .map(|identity| {
            IdentityKey::new(identity.key.kind.clone(), work.lookup(&identity.key.value))
        })
        .collect();
    let previous_lookup = message
        .previous_id
        .as_deref()
        .map(|previous| work.lookup(previous));
    if let (Some(previous), Some(lookup)) = (&message.previous_id, &previous_lookup) {
        if !domain::ingest::is_blocked_identity(previous, &[]) {
            // An alias names an earlier user id when one is known, else an anonymous id.
            let lookup = lookup.clone();
            let kind = if known_user_ids.contains(&lookup) {
                USER_ID
            } else {
                ANONYMOUS_ID
            };
            keys.push(IdentityKey::new(kind, lookup));
        }
    }
    // A message that names an erased person whose identifiers were suppressed is refused whole:
    // storing its traits under another identifier would bring the person back.
    // An alias's previous id is checked under both kinds: once its person is erased, nobody
    // knows it as a user id any more.
    let previous_suppressed = previous_lookup.is_some_and(|lookup| {
        [USER_ID, ANONYMOUS_ID].iter().any(|kind| {
            work.suppressed
                .contains(&((*kind).to_owned(), lookup.clone()))
        })
    });
    if previous_suppressed
        || keys.iter().any(|key| {
            work.suppressed
                .contains(&(key.kind.clone(), key.value.clone()))
        })
    {
        return Err(Rejection {
            code: "suppressed_identity",
            detail: "an identifier of the message belongs to an erased person and is suppressed"
                .to_owned(),
        });
    }
    let now = work.now;
    let resolution = work
        .graph
        .resolve(&keys, work.rules, now, Uuid::now_v7)
        .ok_or_else(|| Rejection {
            code: "no_usable_identity",
            detail: "every identifier of the message is a value that never identifies anybody"
                .to_owned(),
        })?;
    if resolution.created {
        work.profiles.insert(
            resolution.profile,
            Working {
                row: ProfileRow {
                    tenant_id: work.tenant_id,
                    id: resolution.profile,
                    traits: json!({}),
                    trait_clock: json!({}),
                    channels: json!([]),
                    first_seen_at: message.timestamp,
                    last_seen_at: message.timestamp,
                    event_count: 0,
                    merged_into: None,
                    created_at: now,
                    updated_at: now,
                },
                changed: true,
            },
        );
    }
    for merge in &resolution.merges {
        work.merge(merge.survivor, merge.merged);
        work.ledger(
            "merge",
            merge.survivor,
            Some(merge.merged),
            &message.message_id,
            Some(&merge.via),
            "shared_identifier",
        );
    }
    for conflict in &resolution.conflicts {
        work.ledger(
            "conflict",
            conflict.profile,
            conflict.owner,
            &message.message_id,
            Some(&conflict.identity),
            &conflict.rule,
        );
    }
    for key in &resolution.linked {
        let display = work.displays.get(&key.value).cloned().unwrap_or_default();
        work.new_identities
            .push((key.clone(), display, message.message_id.clone()));
    }
    let profile_id = resolution.profile;
    let stamp = Stamp {
        at: message.timestamp,
        message_id: message.message_id.clone(),
    };
    let channel = work.source.channel.as_str();
    let working = work
        .profiles
        .get_mut(&profile_id)
        .ok_or_else(|| Rejection {
            code: "internal",
            detail: "the resolved profile is not loaded".to_owned(),
        })?;
    let row = &mut working.row;
    if message.kind == MessageType::Identify && !message.traits.is_empty() {
        // Taken out of the row and put back: the profile's traits are not copied per message.
        let mut traits_map = take_object(&mut row.traits);
        let mut clock = take_object(&mut row.trait_clock);
        let incoming = work
            .sealer
            .seal_object(profile_id, &message.traits, Some(&traits_map));
        traits::apply(&mut traits_map, &mut clock, &incoming, &stamp);
        row.traits = Value::Object(traits_map);
        row.trait_clock = Value::Object(clock);
    }
    row.event_count += 1;
    row.first_seen_at = row.first_seen_at.min(message.timestamp);
    row.last_seen_at = row.last_seen_at.max(message.timestamp);
    let seen_on = row
        .channels
        .as_array()
        .is_some_and(|channels| channels.iter().any(|seen| seen.as_str() == Some(channel)));
    if !seen_on {
        row.channels = union_channels(&row.channels, &json!([channel]));
    }
    working.changed = true;

    for (purpose, granted) in &message.consents {
        let key = (profile_id, purpose.clone());
        let newer = work
            .consents
            .get(&key)
            .is_none_or(|existing| message.timestamp >= existing.updated_at);
        if newer {
            let changed = work
                .consents
                .get(&key)
                .is_none_or(|existing| existing.granted != *granted);
            if changed {
                work.consent_changes.push(store::keys::ConsentChangeRow {
                    tenant_id: work.tenant_id,
                    id: Uuid::now_v7(),
                    profile_id,
                    purpose: purpose.clone(),
                    granted: *granted,
                    source: "message".to_owned(),
                    actor: None,
                    message_id: Some(message.message_id.clone()),
                    at: message.timestamp,
                });
            }
            work.consents.insert(
                key.clone(),
                ConsentRow {
                    tenant_id: work.tenant_id,
                    profile_id,
                    purpose: purpose.clone(),
                    granted: *granted,
                    updated_at: message.timestamp,
                    source: format!("message:{}", message.message_id),
                },
            );
            work.changed_consents.insert(key);
        }
    }

    if let (MessageType::Group, Some(group_id)) = (message.kind, &message.group_id) {
        let group = work
            .groups
            .entry(group_id.clone())
            .or_insert_with(|| GroupRow {
                tenant_id: work.tenant_id,
                group_id: group_id.clone(),
                traits: json!({}),
                trait_clock: json!({}),
                updated_at: now,
            });
        let mut traits_map = take_object(&mut group.traits);
        let mut clock = take_object(&mut group.trait_clock);
        traits::apply(&mut traits_map, &mut clock, &message.traits, &stamp);
        group.traits = Value::Object(traits_map);
        group.trait_clock = Value::Object(clock);
        group.updated_at = now;
        work.changed_groups.insert(group_id.clone());
        work.profile_groups
            .push((profile_id, group_id.clone(), message.timestamp));
    }

    // The event's properties, sealed from the message's own maps (built only where the event
    // adds a key).
    let built: Map<String, Value>;
    let properties = match message.kind {
        MessageType::Identify => &message.traits,
        MessageType::Group => {
            let mut properties = message.traits.clone();
            properties.insert("groupId".to_owned(), json!(message.group_id));
            built = properties;
            &built
        }
        MessageType::Alias => {
            let mut properties = Map::new();
            properties.insert("previousId".to_owned(), json!(message.previous_id));
            built = properties;
            &built
        }
        _ => &message.properties,
    };
    let properties = work.sealer.seal_object(profile_id, properties, None);
    let context = work.sealer.seal_json(profile_id, &message.context);
    let user_id = message.user_id.as_deref().map(|value| work.lookup(value));
    let anonymous_id = message
        .anonymous_id
        .as_deref()
        .map(|value| work.lookup(value));
    let event_id = Uuid::now_v7();
    work.events.push(EventRow {
        tenant_id: work.tenant_id,
        id: event_id,
        profile_id,
        message_id: message.message_id.clone(),
        kind: message.kind.as_str().to_owned(),
        name: message.name.clone(),
        properties: Value::Object(properties),
        context,
        timestamp: message.timestamp,
        received_at,
        source_id: work.source.key_id,
        channel: channel.to_owned(),
        user_id,
        anonymous_id,
    });
    Ok((profile_id, event_id))
}

/// Maps a rejection of a GraphQL-sent message to a BAD_USER_INPUT error naming the input field.
pub fn rejection_error(rejection: &Rejection) -> ServiceError {
    let field = match rejection.code {
        "missing_event" => "input.event",
        "missing_identity" | "no_usable_identity" | "invalid_identifier" => "input.userId",
        "invalid_timestamp" | "timestamp_out_of_range" => "input.timestamp",
        "message_id_too_long" => "input.messageId",
        "too_deep" | "message_too_large" | "nul_character" => "input",
        _ => "input",
    };
    ServiceError::bad_input(field, format!("{}: {}", rejection.code, rejection.detail))
}
