//! The keys of personal data and their use (see `docs/adr/0007-pii-at-rest.md`).
//!
//! Hierarchy: the master key (`CDP_ENCRYPTION_KEY`, never stored) wraps each tenant's key
//! (`tenant_keys`); a tenant key derives the key that wraps its profiles' data keys
//! (`profile_keys`), the key of its blind indexes and the key its other secrets (unsubscribe
//! links, webhook signatures) derive from. A profile's data key seals its identity values, its
//! personal traits, the personal properties and the context of its events, its merge-ledger
//! identifiers and its campaign emails. Destroying the data key (erasure) makes every copy of
//! that data unreadable, backups included.
//!
//! Guarantees: no personal value reaches the store unsealed through [`Sealer`]; a value whose
//! key was destroyed opens as nothing (`null`), never as an error that would stop a page.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use domain::pii::{self, PiiKeys};
use domain::TenantId;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::crypto::{self, Key};
use crate::store::{self, StoreError, StoreResult, TenantTx};

/// The blind-index domain of identity lookups.
const IDENTITY_DOMAIN: &str = "identity";
/// The blind-index domain of personal trait and property values.
const VALUE_DOMAIN: &str = "value";

/// The master keys of this process and the cache of unwrapped tenant keys.
pub struct Vault {
    master: Key,
    /// Earlier master keys, accepted for unwrapping during a rotation.
    previous: Vec<Key>,
    tenants: Mutex<HashMap<TenantId, Arc<TenantKeys>>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("master", &self.master)
            .field("previous", &self.previous)
            .finish_non_exhaustive()
    }
}

/// One tenant's keys, unwrapped.
#[derive(Debug)]
pub struct TenantKeys {
    tenant_id: Uuid,
    /// Wraps the tenant's profile data keys.
    wrap: Key,
    /// Keys the blind indexes.
    blind: Key,
    /// Derives the tenant's other secrets.
    secrets: Key,
}

impl TenantKeys {
    fn from_key(tenant_id: Uuid, key: &Key) -> TenantKeys {
        TenantKeys {
            tenant_id,
            wrap: key.derive("profile-key-wrap"),
            blind: key.derive("blind-index"),
            secrets: key.derive("secrets"),
        }
    }

    /// The stored lookup of an identifier: its blind index. One domain for every kind, so that
    /// an alias's previous id can be looked up before its kind is known.
    pub fn identity_lookup(&self, value: &str) -> String {
        crypto::blind(&self.blind, IDENTITY_DOMAIN, value.as_bytes())
    }

    /// The blind index of a personal trait or property value.
    pub fn value_blind(&self, value: &Value) -> String {
        self.canonical_blind(&pii::canonical(value))
    }

    /// [`TenantKeys::value_blind`] of a value already in its canonical form
    /// ([`pii::canonical`]), for a caller that seals that text too.
    fn canonical_blind(&self, canonical: &str) -> String {
        crypto::blind(&self.blind, VALUE_DOMAIN, canonical.as_bytes())
    }

    /// A secret of this tenant for one purpose; it survives master-key rotation.
    pub fn secret(&self, label: &str) -> Key {
        self.secrets.derive(label)
    }

    fn profile_key_aad(&self, profile_id: Uuid) -> Vec<u8> {
        let mut aad = b"cdp-profile-key-v1".to_vec();
        aad.extend_from_slice(self.tenant_id.as_bytes());
        aad.extend_from_slice(profile_id.as_bytes());
        aad
    }
}

fn tenant_key_aad(tenant_id: Uuid) -> Vec<u8> {
    let mut aad = b"cdp-tenant-key-v1".to_vec();
    aad.extend_from_slice(tenant_id.as_bytes());
    aad
}

impl Vault {
    pub fn new(master: [u8; crypto::KEY_LEN], previous: &[[u8; crypto::KEY_LEN]]) -> Vault {
        Vault {
            master: Key::from_bytes(master),
            previous: previous.iter().map(|key| Key::from_bytes(*key)).collect(),
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// The public id of the current master key.
    pub fn master_id(&self) -> String {
        self.master.id()
    }

    fn cached(&self, tenant_id: TenantId) -> Option<Arc<TenantKeys>> {
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&tenant_id)
            .cloned()
    }

    /// The tenant's keys; a tenant without a key gets one (in this transaction, which must then
    /// be a writing one; tenants get theirs when they are created).
    pub async fn tenant(&self, tx: &TenantTx) -> StoreResult<Arc<TenantKeys>> {
        let tenant_id = tx.tenant_id();
        if let Some(keys) = self.cached(tenant_id) {
            return Ok(keys);
        }
        let (row, created) = match store::keys::tenant_key(tx).await? {
            Some(row) => (row, false),
            None => {
                self.create_tenant_key(tx, chrono::Utc::now()).await?;
                let row = store::keys::tenant_key(tx)
                    .await?
                    .ok_or_else(|| StoreError::corrupt("the tenant key was not stored"))?;
                (row, true)
            }
        };
        let key = self.unwrap_tenant_key(tenant_id, &row)?;
        let keys = Arc::new(TenantKeys::from_key(tenant_id.as_uuid(), &key));
        if created {
            // Not cached until it is committed: if this transaction rolls back, the next one
            // creates (and stores) the key afresh instead of sealing under a key nobody stored.
            return Ok(keys);
        }
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tenant_id, keys.clone());
        Ok(keys)
    }

    /// The keys of a tenant by id, outside any transaction of the caller (workers, links): from
    /// the cache, else read in a transaction of its own. `None` when the tenant has no key.
    pub async fn tenant_of(
        &self,
        store: &store::Store,
        tenant_id: TenantId,
    ) -> StoreResult<Option<Arc<TenantKeys>>> {
        if let Some(keys) = self.cached(tenant_id) {
            return Ok(Some(keys));
        }
        let tx = store.read(tenant_id).await?;
        if store::keys::tenant_key(&tx).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(self.tenant(&tx).await?))
    }

    /// Gives a new tenant its key (a no-op when it has one).
    pub async fn create_tenant_key(&self, tx: &TenantTx, now: DateTime<Utc>) -> StoreResult<()> {
        let key = Key::random();
        let wrapped = crypto::wrap(
            &self.master,
            &tenant_key_aad(tx.tenant_id().as_uuid()),
            &key,
        );
        store::keys::insert_tenant_key(tx, &self.master.id(), &wrapped, now).await
    }

    fn unwrap_tenant_key(
        &self,
        tenant_id: TenantId,
        row: &store::keys::TenantKeyRow,
    ) -> StoreResult<Key> {
        let master = std::iter::once(&self.master)
            .chain(self.previous.iter())
            .find(|key| key.id() == row.master_key_id)
            .ok_or_else(|| {
                StoreError::corrupt(format!(
                    "the key of tenant {tenant_id} is wrapped by master key {}, which this process does not have (CDP_ENCRYPTION_KEY / CDP_ENCRYPTION_KEY_PREVIOUS)",
                    row.master_key_id
                ))
            })?;
        crypto::unwrap(master, &tenant_key_aad(tenant_id.as_uuid()), &row.wrapped)
            .map_err(|error| StoreError::corrupt(format!("the key of tenant {tenant_id}: {error}")))
    }

    /// Rewraps the tenant's key under the current master key if an earlier one wraps it.
    /// Returns whether it did. The tenant key itself does not change, so nothing sealed under it
    /// changes, and processes that still hold it unwrapped keep working.
    pub async fn rewrap(&self, tx: &TenantTx, now: DateTime<Utc>) -> StoreResult<bool> {
        let Some(row) = store::keys::tenant_key(tx).await? else {
            return Ok(false);
        };
        if row.master_key_id == self.master.id() {
            return Ok(false);
        }
        let key = self.unwrap_tenant_key(tx.tenant_id(), &row)?;
        let wrapped = crypto::wrap(
            &self.master,
            &tenant_key_aad(tx.tenant_id().as_uuid()),
            &key,
        );
        store::keys::rewrap_tenant_key(tx, &self.master.id(), &wrapped, now).await?;
        Ok(true)
    }

    async fn profile_keys(
        &self,
        tx: &TenantTx,
        tenant: &TenantKeys,
        profile_ids: &[Uuid],
    ) -> StoreResult<HashMap<Uuid, Key>> {
        let mut keys = HashMap::with_capacity(profile_ids.len());
        for (profile_id, wrapped) in store::keys::profile_keys(tx, profile_ids).await? {
            let key = crypto::unwrap(&tenant.wrap, &tenant.profile_key_aad(profile_id), &wrapped)
                .map_err(|error| {
                StoreError::corrupt(format!("the data key of profile {profile_id}: {error}"))
            })?;
            keys.insert(profile_id, key);
        }
        Ok(keys)
    }

    /// A sealer for writes to these (existing) profiles and to profiles created meanwhile.
    pub async fn sealer(
        &self,
        tx: &TenantTx,
        pii: PiiKeys,
        profile_ids: &[Uuid],
    ) -> StoreResult<Sealer> {
        let tenant = self.tenant(tx).await?;
        let keys = self.profile_keys(tx, &tenant, profile_ids).await?;
        Ok(Sealer {
            tenant,
            pii,
            keys,
            created: Vec::new(),
        })
    }

    /// An opener for the sealed values in `values`: loads the data keys of their owners.
    pub async fn opener<'a>(
        &self,
        tx: &TenantTx,
        values: impl IntoIterator<Item = &'a Value>,
    ) -> StoreResult<Opener> {
        let mut owners = BTreeSet::new();
        for value in values {
            collect_owners(value, &mut owners, 0);
        }
        self.opener_for(tx, owners).await
    }

    /// An opener for values sealed under these profiles' keys.
    pub async fn opener_for(&self, tx: &TenantTx, owners: BTreeSet<Uuid>) -> StoreResult<Opener> {
        if owners.is_empty() {
            return Ok(Opener {
                tenant_id: tx.tenant_id().as_uuid(),
                keys: HashMap::new(),
            });
        }
        let tenant = self.tenant(tx).await?;
        let owners: Vec<Uuid> = owners.into_iter().collect();
        let keys = self.profile_keys(tx, &tenant, &owners).await?;
        Ok(Opener {
            tenant_id: tx.tenant_id().as_uuid(),
            keys,
        })
    }
}

/// Adds the owners of the envelopes in `value` (a sealed value, an envelope string, or an object
/// or array holding them, two levels deep at most: traits, properties, identity lists).
pub fn collect_owners(value: &Value, owners: &mut BTreeSet<Uuid>, depth: usize) {
    match value {
        Value::String(text) => {
            if let Some(owner) = crypto::envelope_owner(text) {
                owners.insert(owner);
            }
        }
        Value::Object(map) => {
            if let Some((_, ciphertext)) = pii::sealed_parts(value) {
                if let Some(owner) = crypto::envelope_owner(ciphertext) {
                    owners.insert(owner);
                }
            } else if depth < 2 {
                for item in map.values() {
                    collect_owners(item, owners, depth + 1);
                }
            }
        }
        Value::Array(items) if depth < 2 => {
            for item in items {
                collect_owners(item, owners, depth + 1);
            }
        }
        _ => {}
    }
}

/// Seals personal data for one write transaction under the data keys of the profiles it lands
/// on, creating the keys of new profiles.
pub struct Sealer {
    tenant: Arc<TenantKeys>,
    pii: PiiKeys,
    keys: HashMap<Uuid, Key>,
    /// Keys created here and not yet stored: (profile, wrapped key).
    created: Vec<(Uuid, String)>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("tenant", &self.tenant.tenant_id)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// JSON that serializes to text without failing: a value, or an object's map (whose keys are
/// strings), so that a message's context is sealed without being copied into a value first.
pub trait JsonText {
    fn json_text(&self) -> String;
}

impl JsonText for Value {
    fn json_text(&self) -> String {
        domain::json::text(self)
    }
}

impl JsonText for Map<String, Value> {
    fn json_text(&self) -> String {
        domain::json::object_text(self)
    }
}

impl Sealer {
    pub fn tenant(&self) -> &TenantKeys {
        &self.tenant
    }

    pub fn pii(&self) -> &PiiKeys {
        &self.pii
    }

    fn key(&mut self, owner: Uuid) -> &Key {
        let tenant = &self.tenant;
        let created = &mut self.created;
        self.keys.entry(owner).or_insert_with(|| {
            let key = Key::random();
            created.push((
                owner,
                crypto::wrap(&tenant.wrap, &tenant.profile_key_aad(owner), &key),
            ));
            key
        })
    }

    /// Seals a text (an identity value, an email address) as an envelope.
    pub fn seal_text(&mut self, owner: Uuid, text: &str) -> String {
        let tenant_id = self.tenant.tenant_id;
        let key = self.key(owner).clone();
        crypto::seal_envelope(tenant_id, owner, &key, text.as_bytes())
    }

    /// Seals a whole JSON value (an event context, as a value or an object) as an envelope
    /// string.
    pub fn seal_json(&mut self, owner: Uuid, value: &impl JsonText) -> Value {
        Value::String(self.seal_text(owner, &value.json_text()))
    }

    /// Seals one personal value as `{"bi", "ct"}`; `null` and already sealed values stay.
    pub fn seal_value(&mut self, owner: Uuid, value: &Value) -> Value {
        if value.is_null() || pii::is_sealed(value) {
            return value.clone();
        }
        // The canonical form is the value's JSON text: written once, indexed and sealed.
        let text = pii::canonical(value);
        let blind = self.tenant.canonical_blind(&text);
        let ciphertext = self.seal_text(owner, &text);
        pii::sealed(blind, ciphertext)
    }

    /// Seals the personal keys of a traits or properties object. Where `current` already holds
    /// the same value sealed (same blind index), that sealed value is reused, so that writing an
    /// unchanged value changes nothing.
    pub fn seal_object(
        &mut self,
        owner: Uuid,
        object: &Map<String, Value>,
        current: Option<&Map<String, Value>>,
    ) -> Map<String, Value> {
        let mut out = Map::with_capacity(object.len());
        for (key, value) in object {
            // An incoming value shaped like a sealed one is sealed all the same: only this code
            // decides what is sealed.
            if !self.pii.contains(key) || value.is_null() {
                out.insert(key.clone(), value.clone());
                continue;
            }
            let text = pii::canonical(value);
            let blind = self.tenant.canonical_blind(&text);
            let reused = current
                .and_then(|map| map.get(key))
                .filter(|existing| {
                    pii::sealed_parts(existing)
                        .is_some_and(|(existing_blind, _)| existing_blind == blind)
                })
                .cloned();
            let sealed = match reused {
                Some(existing) => existing,
                None => {
                    let ciphertext = self.seal_text(owner, &text);
                    pii::sealed(blind, ciphertext)
                }
            };
            out.insert(key.clone(), sealed);
        }
        out
    }

    /// Stores the data keys created by this sealer. Call before commit.
    pub async fn save(&mut self, tx: &TenantTx, now: DateTime<Utc>) -> StoreResult<()> {
        if self.created.is_empty() {
            return Ok(());
        }
        let created = std::mem::take(&mut self.created);
        store::keys::insert_profile_keys(tx, &created, now).await
    }
}

/// Opens sealed values with the data keys it loaded.
#[derive(Debug)]
pub struct Opener {
    tenant_id: Uuid,
    keys: HashMap<Uuid, Key>,
}

impl Opener {
    /// An opener without keys: sealed values open as nothing, plain ones stay.
    pub fn empty() -> Opener {
        Opener {
            tenant_id: Uuid::nil(),
            keys: HashMap::new(),
        }
    }

    /// Opens an envelope. `None` when its key is gone (the person was erased) or it does not
    /// open; a text that is no envelope is returned as it is.
    pub fn open_text(&self, text: &str) -> Option<String> {
        let Some(owner) = crypto::envelope_owner(text) else {
            return Some(text.to_owned());
        };
        let key = self.keys.get(&owner)?;
        let plain = crypto::open_envelope(self.tenant_id, key, text).ok()?;
        String::from_utf8(plain).ok()
    }

    /// Opens a sealed value or an envelope string holding JSON; anything else is returned as it
    /// is. A value that does not open becomes `null`.
    pub fn open_value(&self, value: &Value) -> Value {
        let Some(envelope) = sealed_text(value) else {
            return value.clone();
        };
        self.open_text(envelope)
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(Value::Null)
    }

    /// Opens the sealed values at the top level of an object.
    pub fn open_object(&self, value: &Value) -> Value {
        self.open_object_owned(value.clone())
    }

    /// [`Opener::open_object`] of a value the caller gives up: only the sealed values are
    /// replaced, the rest is kept without a copy.
    pub fn open_object_owned(&self, mut value: Value) -> Value {
        match &mut value {
            Value::Object(map) => {
                for item in map.values_mut() {
                    if is_sealed(item) {
                        *item = self.open_value(item);
                    }
                }
                value
            }
            _ => self.open_value_owned(value),
        }
    }

    /// [`Opener::open_value`] of a value the caller gives up.
    pub fn open_value_owned(&self, value: Value) -> Value {
        if is_sealed(&value) {
            self.open_value(&value)
        } else {
            value
        }
    }
}

/// The envelope a sealed value holds (an envelope string, or a sealed object's ciphertext);
/// `None` for a value that is not sealed.
fn sealed_text(value: &Value) -> Option<&str> {
    match value {
        Value::String(text) if crypto::is_envelope(text) => Some(text),
        _ => pii::sealed_parts(value).map(|(_, ciphertext)| ciphertext),
    }
}

fn is_sealed(value: &Value) -> bool {
    sealed_text(value).is_some()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sealer() -> Sealer {
        let tenant = Arc::new(TenantKeys::from_key(Uuid::now_v7(), &Key::random()));
        Sealer {
            tenant,
            pii: PiiKeys::default(),
            keys: HashMap::new(),
            created: Vec::new(),
        }
    }

    #[test]
    fn personal_keys_are_sealed_and_open_again_with_the_owner_key() {
        let mut sealer = sealer();
        let owner = Uuid::now_v7();
        let traits = json!({"email": "jane@example.com", "plan": "pro", "phone": null});
        let sealed = Value::Object(sealer.seal_object(owner, traits.as_object().unwrap(), None));
        assert_eq!(sealed["plan"], json!("pro"));
        assert_eq!(sealed["phone"], Value::Null);
        assert!(pii::is_sealed(&sealed["email"]));
        assert!(!sealed.to_string().contains("jane"));
        assert_eq!(sealer.created.len(), 1);

        let opener = Opener {
            tenant_id: sealer.tenant.tenant_id,
            keys: sealer.keys.clone(),
        };
        assert_eq!(opener.open_object(&sealed), traits);
        let mut owners = BTreeSet::new();
        collect_owners(&sealed, &mut owners, 0);
        assert_eq!(owners, BTreeSet::from([owner]));

        // Without the key (erased), the value opens as null.
        let shredded = Opener {
            tenant_id: sealer.tenant.tenant_id,
            keys: HashMap::new(),
        };
        assert_eq!(shredded.open_object(&sealed)["email"], Value::Null);
    }

    #[test]
    fn an_unchanged_value_reuses_its_sealed_form() {
        let mut sealer = sealer();
        let owner = Uuid::now_v7();
        let first = sealer.seal_object(owner, json!({"email": "a@b.c"}).as_object().unwrap(), None);
        let again = sealer.seal_object(
            owner,
            json!({"email": "a@b.c"}).as_object().unwrap(),
            Some(&first),
        );
        assert_eq!(first, again);
        let changed = sealer.seal_object(
            owner,
            json!({"email": "x@b.c"}).as_object().unwrap(),
            Some(&first),
        );
        assert_ne!(first["email"], changed["email"]);
        assert_eq!(
            sealer.tenant.value_blind(&json!("a@b.c")),
            pii::sealed_parts(&first["email"]).unwrap().0
        );
    }
}
