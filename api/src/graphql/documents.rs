//! Parsed documents, kept per process: a client sends the same few operations again and again
//! (a frontend's queries, persisted or not), and parsing one took about 5 % of the CPU of a
//! `profile(id)` request (docs/PERFORMANCE.md). A request whose text was parsed before gets a
//! copy of that parse (`Request::set_parsed_query`); everything after it (the operation checks,
//! validation, execution) runs as for a fresh parse.
//!
//! Guarantees: only documents that parse are kept (a document with a syntax error is parsed by
//! the schema, which reports it as before); only texts of at most [`MAX_TEXT`] bytes, and at
//! most `capacity` of them, the oldest forgotten first, so a client sending ever new texts
//! costs a bounded amount of memory. Documents carry no data (variables are not part of them),
//! so sharing them between tenants discloses nothing.

use std::sync::{PoisonError, RwLock};

use async_graphql::parser::types::ExecutableDocument;

use super::fifo::Fifo;

/// The longest text kept; longer ones are parsed per request.
pub const MAX_TEXT: usize = 8 * 1024;
/// How many documents a process keeps (each of at most [`MAX_TEXT`] bytes of text).
pub const CAPACITY: usize = 256;

#[derive(Debug)]
pub struct ParsedDocuments {
    known: RwLock<Fifo<ExecutableDocument>>,
}

impl ParsedDocuments {
    /// A cache of at most `capacity` documents; 0 keeps none.
    pub fn new(capacity: usize) -> ParsedDocuments {
        ParsedDocuments {
            known: RwLock::new(Fifo::new(capacity)),
        }
    }

    /// Gives the request the parse of its text: a copy of the kept one, or a new parse, kept
    /// when it succeeds. A text that does not parse is left to the schema.
    pub fn fill(&self, request: &mut async_graphql::Request) {
        if request.query.is_empty() || request.query.len() > MAX_TEXT {
            return;
        }
        let kept = {
            let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
            if known.capacity() == 0 {
                return;
            }
            known.get(&request.query).cloned()
        };
        if let Some(document) = kept {
            request.set_parsed_query(document);
            return;
        }
        let Ok(document) = async_graphql::parser::parse_query(&request.query) else {
            return;
        };
        self.known
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(&request.query, document.clone());
        request.set_parsed_query(document);
    }

    /// How many documents are kept.
    pub fn len(&self) -> usize {
        self.known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_graphql::parser::types::DocumentOperations;

    fn operation_names(request: &mut async_graphql::Request) -> Vec<String> {
        match &request.parsed_query().expect("parses").operations {
            DocumentOperations::Single(_) => vec![String::new()],
            DocumentOperations::Multiple(operations) => {
                let mut names: Vec<String> =
                    operations.keys().map(|name| name.to_string()).collect();
                names.sort();
                names
            }
        }
    }

    #[test]
    fn a_kept_parse_is_the_parse_of_the_same_text() {
        let documents = ParsedDocuments::new(4);
        let text = "query A { me { id } } query B { tenant { id } }";
        let mut first = async_graphql::Request::new(text);
        documents.fill(&mut first);
        assert_eq!(documents.len(), 1);
        let mut again = async_graphql::Request::new(text);
        documents.fill(&mut again);
        assert_eq!(documents.len(), 1);
        assert_eq!(operation_names(&mut again), vec!["A", "B"]);
        // The copy is the document the schema would have parsed itself.
        let fresh = async_graphql::parser::parse_query(text).expect("parses");
        // (Compared as JSON: the operations are a hash map, whose debug order varies.)
        let json = |document: &ExecutableDocument| serde_json::to_value(document).expect("JSON");
        assert_eq!(json(again.parsed_query().expect("parses")), json(&fresh));
    }

    #[test]
    fn syntax_errors_long_texts_and_a_zero_capacity_keep_nothing() {
        let documents = ParsedDocuments::new(4);
        let mut broken = async_graphql::Request::new("query { me { id ");
        documents.fill(&mut broken);
        assert!(documents.is_empty());
        // The schema still reports the error of its own parse.
        assert!(broken.parsed_query().is_err());

        let long = format!("{{ me {{ id }} }} # {}", "x".repeat(MAX_TEXT));
        let mut request = async_graphql::Request::new(long);
        documents.fill(&mut request);
        assert!(documents.is_empty());
        assert!(request.parsed_query().is_ok());

        let none = ParsedDocuments::new(0);
        let mut request = async_graphql::Request::new("{ me { id } }");
        none.fill(&mut request);
        assert!(none.is_empty());
    }

    #[test]
    fn the_oldest_document_is_forgotten_first() {
        let documents = ParsedDocuments::new(2);
        for text in ["{ a }", "{ b }", "{ c }"] {
            documents.fill(&mut async_graphql::Request::new(text));
        }
        assert_eq!(documents.len(), 2);
        let known = documents.known.read().expect("not poisoned");
        assert!(known.get("{ a }").is_none());
        assert!(known.get("{ b }").is_some());
        assert!(known.get("{ c }").is_some());
    }
}
