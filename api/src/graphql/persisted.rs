//! Automatic persisted queries (Apollo's APQ protocol): a client sends the SHA-256 of a query in
//! `extensions.persistedQuery.sha256Hash` without the query; the server answers
//! `PersistedQueryNotFound` the first time, the client sends hash and query together once, and
//! from then on the hash alone does, in a short POST body or a short, cacheable GET URL.
//!
//! Guarantees: a query is remembered only when its text hashes to the hash sent with it; the
//! cache is bounded (`CDP_GRAPHQL_APQ_CAPACITY` queries, the oldest forgotten first) and per
//! process, so a replica that does not know a hash asks for the query again, as the protocol
//! foresees. Queries carry no data, so sharing the cache between tenants discloses nothing a
//! client could not compute itself.

use std::sync::{Arc, Mutex, PoisonError};

use async_graphql::Value;
use sha2::{Digest, Sha256};

use super::fifo::Fifo;

/// The error a client of the protocol recognizes, with its code.
pub const NOT_FOUND: (&str, &str) = ("PersistedQueryNotFound", "PERSISTED_QUERY_NOT_FOUND");

/// Why a request's persisted query could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The hash is not known here: send it again with the query.
    NotFound,
    /// The request is malformed: the message says how.
    Invalid(String),
}

/// Queries by the SHA-256 of their text (hex, lower case).
#[derive(Debug)]
pub struct PersistedQueries {
    known: Mutex<Fifo<Arc<str>>>,
}

impl PersistedQueries {
    /// A cache of at most `capacity` queries; 0 turns the protocol off (a hash alone is then
    /// always "not found", and a hash with its query is run without being remembered).
    pub fn new(capacity: usize) -> PersistedQueries {
        PersistedQueries {
            known: Mutex::new(Fifo::new(capacity)),
        }
    }

    /// Applies the protocol to one request: fills in the query of a hash-only request, checks
    /// and remembers a query sent with its hash. A request without the extension is untouched.
    pub fn resolve(&self, request: &mut async_graphql::Request) -> Result<(), Refusal> {
        let Some(extension) = request.extensions.get("persistedQuery") else {
            return Ok(());
        };
        let Value::Object(fields) = extension else {
            return Err(Refusal::Invalid(
                "extensions.persistedQuery must be an object".to_owned(),
            ));
        };
        match fields.get("version") {
            Some(Value::Number(version)) if version.as_u64() == Some(1) => {}
            _ => {
                return Err(Refusal::Invalid(
                    "extensions.persistedQuery.version must be 1".to_owned(),
                ))
            }
        }
        let hash = match fields.get("sha256Hash") {
            Some(Value::String(hash))
                if hash.len() == 64 && hash.bytes().all(|byte| byte.is_ascii_hexdigit()) =>
            {
                hash.to_ascii_lowercase()
            }
            _ => {
                return Err(Refusal::Invalid(
                    "extensions.persistedQuery.sha256Hash must be 64 hexadecimal digits".to_owned(),
                ))
            }
        };
        if request.query.is_empty() {
            let known = self.lock();
            let query = known.get(&hash).ok_or(Refusal::NotFound)?;
            request.query = query.to_string();
            return Ok(());
        }
        if hex::encode(Sha256::digest(request.query.as_bytes())) != hash {
            return Err(Refusal::Invalid(
                "extensions.persistedQuery.sha256Hash is not the SHA-256 of the query".to_owned(),
            ));
        }
        self.lock().insert(&hash, Arc::from(request.query.as_str()));
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fifo<Arc<str>>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_hash(query: &str, hash: &str) -> async_graphql::Request {
        let mut request = async_graphql::Request::new(query);
        request.extensions.insert(
            "persistedQuery".to_owned(),
            Value::from_json(serde_json::json!({"version": 1, "sha256Hash": hash}))
                .unwrap_or_default(),
        );
        request
    }

    fn hash(query: &str) -> String {
        hex::encode(Sha256::digest(query.as_bytes()))
    }

    #[test]
    fn a_hash_is_known_once_sent_with_its_query() {
        let cache = PersistedQueries::new(2);
        let query = "{ me { user { email } } }";
        let mut alone = with_hash("", &hash(query));
        assert_eq!(cache.resolve(&mut alone), Err(Refusal::NotFound));
        cache.resolve(&mut with_hash(query, &hash(query))).unwrap();
        let mut alone = with_hash("", &hash(query).to_uppercase());
        cache.resolve(&mut alone).unwrap();
        assert_eq!(alone.query, query);
        // Untouched without the extension.
        let mut plain = async_graphql::Request::new("{ a }");
        cache.resolve(&mut plain).unwrap();
        assert_eq!(plain.query, "{ a }");
    }

    #[test]
    fn a_wrong_hash_is_refused_and_not_remembered() {
        let cache = PersistedQueries::new(2);
        let forged = hash("{ other }");
        let mut request = with_hash("{ me { user { email } } }", &forged);
        assert!(matches!(
            cache.resolve(&mut request),
            Err(Refusal::Invalid(_))
        ));
        assert_eq!(
            cache.resolve(&mut with_hash("", &forged)),
            Err(Refusal::NotFound)
        );
        assert!(matches!(
            cache.resolve(&mut with_hash("", "abc")),
            Err(Refusal::Invalid(_))
        ));
    }

    #[test]
    fn the_oldest_query_is_forgotten_past_the_capacity() {
        let cache = PersistedQueries::new(2);
        for query in ["{ a }", "{ b }", "{ c }"] {
            cache.resolve(&mut with_hash(query, &hash(query))).unwrap();
        }
        assert_eq!(
            cache.resolve(&mut with_hash("", &hash("{ a }"))),
            Err(Refusal::NotFound)
        );
        cache.resolve(&mut with_hash("", &hash("{ c }"))).unwrap();
    }
}
