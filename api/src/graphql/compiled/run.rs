//! Answering a request with its [`Plan`]: the arguments from the document and the variables,
//! the reads through the service functions the resolvers call (inside the request's read scope,
//! as the resolvers run), and the answer written as JSON in the order of the selections, with
//! the values formatted as async-graphql formats them.

use std::collections::HashMap;
use std::io::Write as _;

use async_graphql_value::ConstValue;
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::{
    Arg, ConnectionField, EdgeField, EventField, PageInfoField, Plan, ProfileField, Root, Selected,
};
use crate::auth::Principal;
use crate::graphql::types::total_count;
use crate::graphql::RequestContext;
use crate::service::pagination::{Page, DEFAULT_PAGE};
use crate::service::profiles::{self, Event, EventOwner, Profile};
use crate::service::AppState;

/// The JSON body of the answer to `request` (`{"data":…}`), or `None` when the schema must
/// answer it (see the module documentation of `compiled`).
pub(crate) async fn answer(
    plan: &Plan,
    request: &async_graphql::Request,
    context: &RequestContext,
    state: &AppState,
) -> Option<Vec<u8>> {
    if let Some(name) = &request.operation_name {
        if plan.operation_name.as_deref() != Some(name.as_str()) {
            return None;
        }
    }
    if context.auth_error.is_some()
        || crate::graphql::document::variables_hold_nul(&request.variables)
    {
        return None;
    }
    let run = Run {
        plan,
        variables: &request.variables,
        state,
        principal: context.principal.as_ref()?,
    };
    let mut out = Vec::with_capacity(8 * 1024);
    out.extend_from_slice(b"{\"data\":{");
    for (index, root) in plan.roots.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        key(&mut out, &root.key);
        match &root.field {
            Root::Profile { id, fields } => run.profile(&mut out, id, fields).await?,
            Root::Profiles {
                first,
                after,
                fields,
            } => run.profiles(&mut out, first, after, fields).await?,
        }
    }
    out.extend_from_slice(b"}}");
    Some(out)
}

struct Run<'a> {
    plan: &'a Plan,
    variables: &'a async_graphql::Variables,
    state: &'a AppState,
    principal: &'a Principal,
}

/// The first events of each profile of one `events` selection, by profile id.
type EventPages = HashMap<Uuid, Page<Event>>;

impl Run<'_> {
    /// The value of `arg`: `Some(None)` when absent, `None` for a variable that has no value.
    fn value(&self, arg: &Arg) -> Option<Option<ConstValue>> {
        match arg {
            Arg::Absent => Some(None),
            Arg::Literal(value) => Some(Some(value.clone())),
            Arg::Variable(name) => {
                let declared = self.plan.variables.iter().find(|v| &v.name == name)?;
                let value = self
                    .variables
                    .get(name)
                    .or(declared.absent.as_ref())?
                    .clone();
                // A value of another type, or null for a non-null type, is the schema's to refuse.
                declared.ty.admits(&value).then_some(Some(value))
            }
        }
    }

    fn id(&self, arg: &Arg) -> Option<String> {
        match self.value(arg)?? {
            ConstValue::String(id) => Some(id),
            _ => None,
        }
    }

    /// `first`: the default when absent, `None` for null.
    fn first(&self, arg: &Arg) -> Option<Option<i32>> {
        match self.value(arg)? {
            // The schema's `default = 50`, the service's default page.
            None => Some(Some(DEFAULT_PAGE)),
            Some(ConstValue::Null) => Some(None),
            Some(ConstValue::Number(number)) => Some(Some(i32::try_from(number.as_i64()?).ok()?)),
            Some(_) => None,
        }
    }

    fn after(&self, arg: &Arg) -> Option<Option<String>> {
        match self.value(arg)? {
            None | Some(ConstValue::Null) => Some(None),
            Some(ConstValue::String(after)) => Some(Some(after)),
            Some(_) => None,
        }
    }

    async fn profile(
        &self,
        out: &mut Vec<u8>,
        id: &Arg,
        fields: &[Selected<ProfileField>],
    ) -> Option<()> {
        let id = self.id(id)?;
        let found = profiles::get(self.state, Some(self.principal), &id)
            .await
            .ok()?;
        match found {
            None => out.extend_from_slice(b"null"),
            Some(profile) => {
                let events = self.events(fields, &[profile.id]).await?;
                write_profile(out, fields, &profile, &events);
            }
        }
        Some(())
    }

    async fn profiles(
        &self,
        out: &mut Vec<u8>,
        first: &Arg,
        after: &Arg,
        fields: &[Selected<ConnectionField<ProfileField>>],
    ) -> Option<()> {
        let first = self.first(first)?;
        let after = self.after(after)?;
        let count_total = fields
            .iter()
            .any(|selected| matches!(selected.field, ConnectionField::TotalCount));
        let page = profiles::list(
            self.state,
            Some(self.principal),
            profiles::ProfileFilter::default(),
            first,
            after.as_deref(),
            count_total,
        )
        .await
        .ok()?;
        // The nodes' selection (the connection's keys are unique, so at most one `edges` and one
        // `node` in it).
        let node_fields = fields.iter().find_map(|selected| match &selected.field {
            ConnectionField::Edges(edge) => {
                edge.iter().find_map(|selected| match &selected.field {
                    EdgeField::Node(node) => Some(node.as_slice()),
                    EdgeField::Cursor => None,
                })
            }
            _ => None,
        });
        let ids: Vec<Uuid> = page.items.iter().map(|(profile, _)| profile.id).collect();
        let events = match node_fields {
            Some(node_fields) => self.events(node_fields, &ids).await?,
            None => Vec::new(),
        };
        write_connection(out, fields, &page, |out, node, profile| {
            write_profile(out, node, profile, &events);
        });
        Some(())
    }

    /// The event pages of every `events` field of `fields` for `owners`, in the order of
    /// `fields` (`None` for the other fields): one read for all owners per field, as the
    /// request's loader reads them, or a read per owner after a cursor, as the resolver does.
    async fn events(
        &self,
        fields: &[Selected<ProfileField>],
        ids: &[Uuid],
    ) -> Option<Vec<Option<EventPages>>> {
        let mut loaded = Vec::with_capacity(fields.len());
        for selected in fields {
            let ProfileField::Events(events) = &selected.field else {
                loaded.push(None);
                continue;
            };
            let first = self.first(&events.first)?;
            let after = self.after(&events.after)?;
            let wants = events.wants;
            let pages = match after {
                None if ids.is_empty() => HashMap::new(),
                None => {
                    profiles::first_event_pages(self.state, Some(self.principal), ids, first, wants)
                        .await
                        .ok()?
                }
                Some(after) => {
                    let mut pages = HashMap::with_capacity(ids.len());
                    for &id in ids {
                        let page = profiles::events(
                            self.state,
                            Some(self.principal),
                            EventOwner::Resolved(id),
                            None,
                            first,
                            Some(after.as_str()),
                            wants,
                        )
                        .await
                        .ok()?;
                        pages.insert(id, page);
                    }
                    pages
                }
            };
            loaded.push(Some(pages));
        }
        Some(loaded)
    }
}

fn key(out: &mut Vec<u8>, key: &str) {
    // Response keys are GraphQL names (`[_A-Za-z][_0-9A-Za-z]*`): nothing to escape.
    out.push(b'"');
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

fn string(out: &mut Vec<u8>, text: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

fn json(out: &mut Vec<u8>, value: &Value) {
    let _ = serde_json::to_writer(&mut *out, value);
}

fn optional_string(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => string(out, text),
        None => out.extend_from_slice(b"null"),
    }
}

/// As async-graphql's `DateTime<Utc>` scalar writes it (`to_rfc3339`).
fn timestamp(out: &mut Vec<u8>, at: &DateTime<Utc>) {
    string(out, &at.to_rfc3339());
}

fn int(out: &mut Vec<u8>, value: i32) {
    let _ = write!(out, "{value}");
}

fn uuid(out: &mut Vec<u8>, id: &Uuid) {
    let mut buffer = Uuid::encode_buffer();
    string(out, id.hyphenated().encode_lower(&mut buffer));
}

/// Writes an object of `fields`, each through `field`.
fn object<T>(out: &mut Vec<u8>, fields: &[Selected<T>], mut field: impl FnMut(&mut Vec<u8>, &T)) {
    out.push(b'{');
    for (index, selected) in fields.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        key(out, &selected.key);
        field(out, &selected.field);
    }
    out.push(b'}');
}

fn write_profile(
    out: &mut Vec<u8>,
    fields: &[Selected<ProfileField>],
    profile: &Profile,
    events: &[Option<EventPages>],
) {
    out.push(b'{');
    for (index, selected) in fields.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        key(out, &selected.key);
        match &selected.field {
            ProfileField::Id => uuid(out, &profile.id),
            ProfileField::Traits => json(out, &profile.traits),
            ProfileField::Channels => {
                out.push(b'[');
                for (position, channel) in profile.channels.iter().enumerate() {
                    if position > 0 {
                        out.push(b',');
                    }
                    string(out, channel);
                }
                out.push(b']');
            }
            ProfileField::FirstSeenAt => timestamp(out, &profile.first_seen_at),
            ProfileField::LastSeenAt => timestamp(out, &profile.last_seen_at),
            ProfileField::EventCount => {
                int(out, i32::try_from(profile.event_count).unwrap_or(i32::MAX))
            }
            ProfileField::CreatedAt => timestamp(out, &profile.created_at),
            ProfileField::Events(field) => {
                let page = events
                    .get(index)
                    .and_then(Option::as_ref)
                    .and_then(|pages| pages.get(&profile.id));
                // A profile without a page read (none of its own) has an empty one, as the
                // resolver answers.
                let empty;
                let page = match page {
                    Some(page) => page,
                    None => {
                        empty = Page::empty(field.wants.total_count);
                        &empty
                    }
                };
                write_connection(out, &field.fields, page, write_event);
            }
        }
    }
    out.push(b'}');
}

fn write_event(out: &mut Vec<u8>, fields: &[Selected<EventField>], event: &Event) {
    object(out, fields, |out, field| match field {
        EventField::Id => uuid(out, &event.id),
        EventField::ProfileId => uuid(out, &event.profile_id),
        EventField::Type => string(out, &event.kind),
        EventField::Name => optional_string(out, event.name.as_deref()),
        EventField::Properties => json(out, &event.properties),
        EventField::Context => json(out, &event.context),
        EventField::Timestamp => timestamp(out, &event.timestamp),
        EventField::ReceivedAt => timestamp(out, &event.received_at),
        EventField::MessageId => string(out, &event.message_id),
        EventField::Channel => string(out, &event.channel),
        EventField::SourceId => match &event.source_id {
            Some(id) => uuid(out, id),
            None => out.extend_from_slice(b"null"),
        },
    });
}

/// A connection (`edges { cursor node }`, `pageInfo`, `totalCount`) of `page`.
fn write_connection<T, F>(
    out: &mut Vec<u8>,
    fields: &[Selected<ConnectionField<F>>],
    page: &Page<T>,
    mut node: impl FnMut(&mut Vec<u8>, &[Selected<F>], &T),
) {
    object(out, fields, |out, field| match field {
        ConnectionField::TotalCount => int(out, total_count(page.total_count)),
        ConnectionField::PageInfo(info) => object(out, info, |out, field| match field {
            PageInfoField::HasNextPage => out.extend_from_slice(if page.has_next_page {
                b"true"
            } else {
                b"false"
            }),
            PageInfoField::EndCursor => {
                optional_string(out, page.items.last().map(|(_, cursor)| cursor.as_str()))
            }
        }),
        ConnectionField::Edges(edge) => {
            out.push(b'[');
            for (position, (item, cursor)) in page.items.iter().enumerate() {
                if position > 0 {
                    out.push(b',');
                }
                object(out, edge, |out, field| match field {
                    EdgeField::Cursor => string(out, cursor),
                    EdgeField::Node(selection) => node(out, selection, item),
                });
            }
            out.push(b']');
        }
    });
}
