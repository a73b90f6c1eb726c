//! Password hashing with argon2id. Hashing is CPU- and memory-heavy (about 19 MiB each), so it
//! runs on the blocking pool behind a semaphore with a bounded queue: a login flood waits for a
//! few hashing slots, or is refused once the queue is full, instead of starving the request
//! workers or the memory.
//!
//! Guarantees: at most `concurrency` hashes run at once, even when the requests that asked for
//! them are cancelled (the slot is held by the hashing itself); at most `max_queue` operations
//! wait for a slot, and the next one fails at once with [`HashError::Busy`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub struct Hasher {
    permits: Arc<Semaphore>,
    concurrency: u32,
    max_queue: usize,
    /// Operations waiting for a slot now.
    waiting: Arc<AtomicUsize>,
    /// A real hash of a random password, verified against when an account does not exist so that
    /// unknown and known accounts take about the same time.
    dummy_hash: Arc<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("password hashing failed: {0}")]
    Hash(String),
    #[error("password hashing task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("too many password hashes are waiting")]
    Busy,
}

/// Every hashing slot, taken away until it is dropped (see [`Hasher::pause`]).
#[derive(Debug)]
pub struct HashingPause {
    _permits: OwnedSemaphorePermit,
}

/// Counts one waiting operation for as long as it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Hasher {
    /// `concurrency` hashes at once (at least one), and at most `max_queue` waiting.
    pub fn new(concurrency: usize, max_queue: usize) -> Result<Hasher, HashError> {
        let dummy = hash_now("an unused password that nobody knows")?;
        let concurrency = u32::try_from(concurrency.max(1)).unwrap_or(u32::MAX);
        Ok(Hasher {
            permits: Arc::new(Semaphore::new(concurrency as usize)),
            concurrency,
            max_queue,
            waiting: Arc::new(AtomicUsize::new(0)),
            dummy_hash: Arc::new(dummy),
        })
    }

    /// How many hashes may run at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency as usize
    }

    /// How many operations are waiting for a hashing slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Takes every hashing slot (waiting for the running hashes to finish) until the guard is
    /// dropped. Tests use it to hold a login flood in the queue and watch the rest of the
    /// service answer meanwhile.
    pub async fn pause(&self) -> Result<HashingPause, HashError> {
        let permits = self
            .permits
            .clone()
            .acquire_many_owned(self.concurrency)
            .await
            .map_err(|error| HashError::Hash(error.to_string()))?;
        Ok(HashingPause { _permits: permits })
    }

    /// Waits for a slot, or refuses at once when the queue is full.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, HashError> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        if queued >= self.max_queue {
            return Err(HashError::Busy);
        }
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|error| HashError::Hash(error.to_string()))
    }

    pub async fn hash(&self, password: &str) -> Result<String, HashError> {
        let permit = self.slot().await?;
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            // The slot is released when the hash is done, not when the request gives up.
            let _permit = permit;
            hash_now(&password)
        })
        .await?
    }

    /// Verifies a password against a stored hash, or against the dummy hash when there is none,
    /// always spending the same work.
    pub async fn verify(
        &self,
        stored_hash: Option<&str>,
        password: &str,
    ) -> Result<bool, HashError> {
        let permit = self.slot().await?;
        let has_hash = stored_hash.is_some();
        let hash = stored_hash
            .map(str::to_owned)
            .unwrap_or_else(|| self.dummy_hash.as_ref().clone());
        let password = password.to_owned();
        let matches = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await?;
        Ok(has_hash && matches)
    }
}

fn hash_now(password: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| HashError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_a_paused_hasher_resumes() {
        let hasher = Hasher::new(1, 1).unwrap();
        let pause = hasher.pause().await.unwrap();
        let queued = tokio::spawn({
            let hasher = hasher.clone();
            async move { hasher.hash("a long enough password").await }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while hasher.waiting() < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the hash never queued"
            );
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            hasher.verify(None, "anything").await,
            Err(HashError::Busy)
        ));
        assert!(!queued.is_finished());
        drop(pause);
        let hash = queued.await.unwrap().unwrap();
        assert!(hasher
            .verify(Some(&hash), "a long enough password")
            .await
            .unwrap());
        assert_eq!(hasher.waiting(), 0);
    }
}
