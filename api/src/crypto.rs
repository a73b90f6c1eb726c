//! The cryptographic primitives of personal-data protection (ADR 0007): AES-256-GCM sealing with
//! associated data, key wrapping, HMAC-SHA256 blind indexes and key derivation, and the text
//! envelope a sealed personal value is stored in. No IO and no key storage: `service::vault`
//! decides which key seals what.
//!
//! Guarantees: every ciphertext carries a fresh random 96-bit nonce and is bound to its context
//! (tenant, key owner) through the associated data, so a ciphertext copied to another tenant or
//! another profile does not open.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use uuid::Uuid;

/// Bytes of a key.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
/// Bytes of a blind index kept: 128 bits, ample against collisions and half the size of the
/// whole HMAC in every index.
const BLIND_LEN: usize = 16;
/// The prefix of a sealed personal value: version 1, then the key owner and the ciphertext.
const ENVELOPE_PREFIX: &str = "p1";

/// A 256-bit symmetric key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material, not even in debug logs.
        write!(f, "Key({})", self.id())
    }
}

impl Key {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// A new key from the operating system's random source.
    pub fn random() -> Key {
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Key(bytes)
    }

    /// A subkey for one purpose (HMAC-SHA256 of the label): keys for different purposes never
    /// coincide, and knowing one says nothing about the other.
    pub fn derive(&self, label: &str) -> Key {
        Key(hmac(&self.0, &[b"cdp-derive-v1\0", label.as_bytes()]))
    }

    /// A short public identifier of the key (not secret: a hash), to tell which master key
    /// wrapped a tenant key.
    pub fn id(&self) -> String {
        hex::encode(&hmac(&self.0, &[b"cdp-key-id-v1"])[..8])
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail.
    #[allow(clippy::expect_used)]
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Why a ciphertext did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("the ciphertext is malformed")]
    Malformed,
    #[error("the ciphertext does not open with this key and context")]
    Rejected,
}

/// Encrypts `plain` under `key`, bound to `aad`: `nonce || ciphertext || tag`.
pub fn seal(key: &Key, aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.0.as_slice().into());
    let mut nonce = [0u8; NONCE_LEN];
    // The thread's CSPRNG (ChaCha, seeded and reseeded from the operating system) rather than a
    // system call for each of the several values a message seals.
    rand::thread_rng().fill_bytes(&mut nonce);
    // Encryption fails only for plaintexts beyond 64 GiB, far above any value we seal.
    #[allow(clippy::expect_used)]
    let body = cipher
        .encrypt(&Nonce::from(nonce), Payload { msg: plain, aad })
        .expect("AES-GCM seals any plaintext under 64 GiB");
    let mut out = Vec::with_capacity(NONCE_LEN + body.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&body);
    out
}

/// Decrypts what [`seal`] produced with the same key and associated data.
pub fn open(key: &Key, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(CryptoError::Malformed);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| CryptoError::Malformed)?;
    let cipher = Aes256Gcm::new(key.0.as_slice().into());
    cipher
        .decrypt(&Nonce::from(nonce), Payload { msg: body, aad })
        .map_err(|_| CryptoError::Rejected)
}

/// Wraps (encrypts) a key under a key-encryption key, as URL-safe base64.
pub fn wrap(kek: &Key, aad: &[u8], key: &Key) -> String {
    URL_SAFE_NO_PAD.encode(seal(kek, aad, &key.0))
}

/// Unwraps what [`wrap`] produced.
pub fn unwrap(kek: &Key, aad: &[u8], wrapped: &str) -> Result<Key, CryptoError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(wrapped)
        .map_err(|_| CryptoError::Malformed)?;
    let plain = open(kek, aad, &bytes)?;
    let key: [u8; KEY_LEN] = plain.try_into().map_err(|_| CryptoError::Malformed)?;
    Ok(Key(key))
}

/// A keyed blind index: equal inputs give equal outputs under one key, and without the key the
/// output says nothing about the input (not even for guessable inputs such as phone numbers).
/// `domain` separates uses (an email identity and an email trait never share an index).
pub fn blind(key: &Key, domain: &str, value: &[u8]) -> String {
    let mac = hmac(&key.0, &[domain.as_bytes(), b"\0", value]);
    URL_SAFE_NO_PAD.encode(&mac[..BLIND_LEN])
}

/// The associated data of a personal value sealed under the data key of profile `owner`.
fn envelope_aad(tenant_id: Uuid, owner: Uuid) -> Vec<u8> {
    let mut aad = Vec::with_capacity(48);
    aad.extend_from_slice(b"cdp-pii-v1");
    aad.extend_from_slice(tenant_id.as_bytes());
    aad.extend_from_slice(owner.as_bytes());
    aad
}

/// Seals a personal value under the data key of profile `owner`, as the stored text
/// `p1.<owner>.<base64url(nonce || ciphertext)>`. The owner is named so that the value still
/// opens after it moved to another profile in a merge.
pub fn seal_envelope(tenant_id: Uuid, owner: Uuid, key: &Key, plain: &[u8]) -> String {
    let sealed = seal(key, &envelope_aad(tenant_id, owner), plain);
    format!(
        "{ENVELOPE_PREFIX}.{}.{}",
        owner.simple(),
        URL_SAFE_NO_PAD.encode(sealed)
    )
}

/// The profile whose data key sealed an envelope.
pub fn envelope_owner(envelope: &str) -> Option<Uuid> {
    let mut parts = envelope.splitn(3, '.');
    if parts.next()? != ENVELOPE_PREFIX {
        return None;
    }
    Uuid::parse_str(parts.next()?).ok()
}

/// Opens an envelope with the data key of its owner.
pub fn open_envelope(tenant_id: Uuid, key: &Key, envelope: &str) -> Result<Vec<u8>, CryptoError> {
    let mut parts = envelope.splitn(3, '.');
    if parts.next() != Some(ENVELOPE_PREFIX) {
        return Err(CryptoError::Malformed);
    }
    let owner = parts
        .next()
        .and_then(|text| Uuid::parse_str(text).ok())
        .ok_or(CryptoError::Malformed)?;
    let body = parts
        .next()
        .and_then(|text| URL_SAFE_NO_PAD.decode(text).ok())
        .ok_or(CryptoError::Malformed)?;
    open(key, &envelope_aad(tenant_id, owner), &body)
}

/// Whether a stored text is a sealed envelope.
/// Whether two secrets are equal, in a time that depends on their length only.
pub fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len()
        && left
            .iter()
            .zip(right)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

pub fn is_envelope(text: &str) -> bool {
    envelope_owner(text).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_context() {
        let key = Key::random();
        let sealed = seal(&key, b"context", b"jane@example.com");
        assert_eq!(
            open(&key, b"context", &sealed).unwrap(),
            b"jane@example.com"
        );
        assert_eq!(
            open(&key, b"other context", &sealed),
            Err(CryptoError::Rejected)
        );
        assert_eq!(
            open(&Key::random(), b"context", &sealed),
            Err(CryptoError::Rejected)
        );
        let mut tampered = sealed.clone();
        tampered[20] ^= 1;
        assert_eq!(
            open(&key, b"context", &tampered),
            Err(CryptoError::Rejected)
        );
        // A fresh nonce each time: sealing the same value twice gives different bytes.
        assert_ne!(seal(&key, b"context", b"x"), seal(&key, b"context", b"x"));
    }

    #[test]
    fn wrapped_keys_unwrap_under_the_same_kek_only() {
        let kek = Key::random();
        let key = Key::random();
        let wrapped = wrap(&kek, b"t1", &key);
        assert_eq!(unwrap(&kek, b"t1", &wrapped).unwrap(), key);
        assert!(unwrap(&kek, b"t2", &wrapped).is_err());
        assert!(unwrap(&Key::random(), b"t1", &wrapped).is_err());
        assert_eq!(
            unwrap(&kek, b"t1", "not base64!"),
            Err(CryptoError::Malformed)
        );
    }

    #[test]
    fn blind_indexes_are_deterministic_per_key_and_domain() {
        let key = Key::random();
        let a = blind(&key, "email", b"jane@example.com");
        assert_eq!(a, blind(&key, "email", b"jane@example.com"));
        assert_ne!(a, blind(&key, "trait", b"jane@example.com"));
        assert_ne!(a, blind(&Key::random(), "email", b"jane@example.com"));
        assert!(!a.contains("jane"));
        assert_eq!(a.len(), 22);
    }

    #[test]
    fn envelopes_name_their_owner_and_bind_the_tenant() {
        let tenant = Uuid::now_v7();
        let owner = Uuid::now_v7();
        let key = Key::random();
        let envelope = seal_envelope(tenant, owner, &key, b"+4915112345678");
        assert_eq!(envelope_owner(&envelope), Some(owner));
        assert!(is_envelope(&envelope));
        assert!(!envelope.contains("4915112345678"));
        assert_eq!(
            open_envelope(tenant, &key, &envelope).unwrap(),
            b"+4915112345678"
        );
        assert!(open_envelope(Uuid::now_v7(), &key, &envelope).is_err());
        assert!(!is_envelope("plain text"));
    }

    #[test]
    fn derived_keys_differ_by_label_and_debug_output_hides_material() {
        let key = Key::from_bytes([7; KEY_LEN]);
        assert_ne!(key.derive("a"), key.derive("b"));
        assert_eq!(key.derive("a"), key.derive("a"));
        let shown = format!("{key:?}");
        assert!(!shown.contains("7, 7"));
        assert_eq!(shown, format!("Key({})", key.id()));
    }
}
