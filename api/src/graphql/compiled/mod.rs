//! Compiled plans for the hottest read shapes (ADR 0016): a `profile(id)` or a `profiles` page
//! with a profile's own fields and the first page of its timeline, answered by calling the same
//! service functions the resolvers call and writing the JSON answer directly, without
//! async-graphql's executor (a boxed future and a `ConstValue` per field, about a third of the CPU
//! of such a request; docs/PERFORMANCE.md, Read path).
//!
//! A plan is compiled once per document text (`plan.rs`) and kept beside the parsed documents;
//! only documents that are certainly valid and within every limit get one, everything else runs
//! through the schema as before.
//!
//! Guarantees: for a document with a plan the answer is the JSON the schema gives
//! (`tests/suite/compiled.rs` compares both, parsed, over real HTTP, on SQLite and PostgreSQL,
//! for every shape and for principals with and without PII_READ), its keys in the order of the
//! selections as GraphQL specifies (async-graphql's executor writes them in the order its field
//! futures complete, so its order can differ); a request the plan cannot answer exactly (an operation name it does not hold, a variable of
//! another type or with a NUL, no principal, a service error) runs through the schema instead,
//! which answers it with its errors. Plans hold no data: sharing them between tenants discloses
//! nothing.

mod plan;
mod run;

use std::sync::{Arc, PoisonError, RwLock};

use async_graphql::Name;
use async_graphql_value::ConstValue;

use super::fifo::Fifo;
use super::limits::Admission;
use crate::service::profiles::EventPageWants;

pub(super) use run::answer;

/// The limits a compiled document must keep within: the schema's depth and complexity limits
/// and the transport's admission checks.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_depth: usize,
    pub max_complexity: usize,
    pub admission: Admission,
}

/// What the plans know of a document text.
pub(super) enum Lookup {
    Plan(Arc<Plan>),
    /// Compiled before, without a plan: the schema answers it.
    NoPlan,
    Unknown,
}

/// The plans of the document texts seen, at most `capacity` of them (the oldest forgotten
/// first), texts without a plan included so that they are not compiled again.
#[derive(Debug)]
pub struct Plans {
    limits: Option<Limits>,
    known: RwLock<Fifo<Option<Arc<Plan>>>>,
}

impl Plans {
    /// Plans compiled against `limits`; `None` (or a capacity of 0) compiles nothing.
    pub fn new(capacity: usize, limits: Option<Limits>) -> Plans {
        Plans {
            limits,
            known: RwLock::new(Fifo::new(if limits.is_some() { capacity } else { 0 })),
        }
    }

    pub(super) fn lookup(&self, text: &str) -> Lookup {
        let known = self.known.read().unwrap_or_else(PoisonError::into_inner);
        match known.get(text) {
            Some(Some(plan)) => Lookup::Plan(plan.clone()),
            Some(None) => Lookup::NoPlan,
            None => Lookup::Unknown,
        }
    }

    /// Compiles the document of `request` (parsed here if it is not yet; the parse stays in the
    /// request) and keeps the outcome under its text; the plan, if any. Nothing is parsed or kept
    /// without limits, for a capacity of 0, or for a text longer than the parsed documents keep
    /// ([`super::documents::MAX_TEXT`]).
    pub(super) fn learn(&self, request: &mut async_graphql::Request) -> Option<Arc<Plan>> {
        let limits = self.limits.as_ref()?;
        if request.query.len() > super::documents::MAX_TEXT
            || self
                .known
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .capacity()
                == 0
        {
            return None;
        }
        let text = request.query.clone();
        let document = request.parsed_query().ok()?;
        let plan = plan::compile(document, limits).map(Arc::new);
        self.known
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(&text, plan.clone());
        plan
    }
}

/// A compiled query: its variables and root fields.
#[derive(Debug)]
pub struct Plan {
    /// The operation's name, if it has one.
    operation_name: Option<Name>,
    variables: Vec<Variable>,
    roots: Vec<Selected<Root>>,
}

/// A declared variable.
#[derive(Debug)]
struct Variable {
    name: Name,
    ty: Type,
    /// Its value when the request does not send it: the default, or null for a nullable type.
    absent: Option<ConstValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    Id,
    Int,
    String,
}

/// A type the plans read, of an argument or a variable: `ID!`, `Int`, `Int!`, `String`,
/// `String!`.
#[derive(Debug, Clone, Copy)]
struct Type {
    scalar: Scalar,
    nullable: bool,
}

impl Type {
    /// Whether `value` is of this type as the plans take it: an ID only as a string, an Int
    /// within `i32`, null only for a nullable type. Anything else is the schema's to coerce or
    /// refuse; one rule for literals, defaults and the variables a request sends.
    fn admits(self, value: &ConstValue) -> bool {
        match (value, self.scalar) {
            (ConstValue::Null, _) => self.nullable,
            (ConstValue::String(_), Scalar::Id | Scalar::String) => true,
            (ConstValue::Number(number), Scalar::Int) => {
                number.as_i64().is_some_and(|n| i32::try_from(n).is_ok())
            }
            _ => false,
        }
    }
}

/// An argument as the document gives it.
#[derive(Debug, Clone)]
enum Arg {
    Absent,
    Literal(ConstValue),
    Variable(Name),
}

/// A field under its response key (its alias, or its name).
#[derive(Debug)]
struct Selected<T> {
    key: String,
    field: T,
}

#[derive(Debug)]
enum Root {
    Profile {
        id: Arg,
        fields: Vec<Selected<ProfileField>>,
    },
    Profiles {
        first: Arg,
        after: Arg,
        fields: Vec<Selected<ConnectionField<ProfileField>>>,
    },
}

#[derive(Debug)]
enum ProfileField {
    Id,
    Traits,
    Channels,
    FirstSeenAt,
    LastSeenAt,
    EventCount,
    CreatedAt,
    Events(EventsField),
}

/// `Profile.events(first, after)`.
#[derive(Debug)]
struct EventsField {
    first: Arg,
    after: Arg,
    fields: Vec<Selected<ConnectionField<EventField>>>,
    /// What the selection reads ([`EventsField::wants_of`]), known when the plan is compiled.
    wants: EventPageWants,
}

impl EventsField {
    /// What `fields` read: the total only when `totalCount` is selected, the contexts only when
    /// `context` is (as `customers::event_page_wants`), the details only when one of them is
    /// ([`EventField::needs`]), the cursors only when `cursor` or `endCursor` is.
    fn wants_of(fields: &[Selected<ConnectionField<EventField>>]) -> EventPageWants {
        let mut wants = EventPageWants {
            total_count: false,
            context: false,
            details: false,
            cursors: false,
        };
        for selected in fields {
            match &selected.field {
                ConnectionField::TotalCount => wants.total_count = true,
                ConnectionField::PageInfo(info) => {
                    wants.cursors |= info
                        .iter()
                        .any(|selected| matches!(selected.field, PageInfoField::EndCursor));
                }
                ConnectionField::Edges(edges) => {
                    for edge in edges {
                        match &edge.field {
                            EdgeField::Cursor => wants.cursors = true,
                            EdgeField::Node(node) => node
                                .iter()
                                .for_each(|selected| selected.field.needs(&mut wants)),
                        }
                    }
                }
            }
        }
        wants
    }
}

#[derive(Debug)]
enum EventField {
    Id,
    ProfileId,
    Type,
    Name,
    Properties,
    Context,
    Timestamp,
    ReceivedAt,
    MessageId,
    Channel,
    SourceId,
}

impl EventField {
    /// Marks in `wants` what answering this field reads beyond a timeline's columns: the
    /// context, or the details (message id, channel, source, time received).
    fn needs(&self, wants: &mut EventPageWants) {
        match self {
            EventField::Context => wants.context = true,
            EventField::MessageId
            | EventField::Channel
            | EventField::SourceId
            | EventField::ReceivedAt => wants.details = true,
            EventField::Id
            | EventField::ProfileId
            | EventField::Type
            | EventField::Name
            | EventField::Properties
            | EventField::Timestamp => {}
        }
    }
}

/// A field of a connection whose nodes select `T`s.
#[derive(Debug)]
enum ConnectionField<T> {
    Edges(Vec<Selected<EdgeField<T>>>),
    PageInfo(Vec<Selected<PageInfoField>>),
    TotalCount,
}

#[derive(Debug)]
enum EdgeField<T> {
    Node(Vec<Selected<T>>),
    Cursor,
}

#[derive(Debug)]
enum PageInfoField {
    HasNextPage,
    EndCursor,
}
