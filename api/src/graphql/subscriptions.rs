//! The `Subscription` root: live profile changes, events, segment membership changes and stage
//! transitions, over `/graphql/ws` (see `transport.rs` for the socket and `docs/realtime.md`).
//!
//! Guarantees: a subscriber receives only its own tenant's notices (checked on every message
//! against the principal of the socket); details are masked like queries (without PII_READ);
//! a subscriber that falls behind gets an error item saying how many notices it missed and the
//! stream goes on; an access token that expires ends the stream (and `transport.rs` closes the
//! socket). Other subscription fields (`emailDeliveryUpdated`) build on [`tenant_notices`].

use std::sync::Arc;

use async_graphql::{Context, ErrorExtensions, Result, SimpleObject, Subscription, ID};
use chrono::{DateTime, Utc};
use domain::Permission;
use futures::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use super::accounts::{Env, ServiceResultExt};
use super::customers::{Event, Profile};
use super::segments::{LifecycleTransition, SegmentMembershipChange};
use super::service_error;
use crate::auth::Principal;
use crate::service::auth::require_permission;
use crate::service::bus::Notice;
use crate::service::realtime::{LiveItem, LiveNotice, Permit};
use crate::service::ServiceError;

/// What `connection_init` established for one socket, in the connection data next to the
/// `RequestContext`: when the credentials stop being valid, and the socket's place in its
/// tenant's limit (released when the socket closes and the data is dropped).
#[derive(Debug)]
pub struct SocketSession {
    pub expires_at: Option<DateTime<Utc>>,
    /// Held, never read: dropping it frees the socket's place.
    _permit: Permit,
}

impl SocketSession {
    pub fn new(expires_at: Option<DateTime<Utc>>, permit: Permit) -> SocketSession {
        SocketSession {
            expires_at,
            _permit: permit,
        }
    }
}

/// One change to a profile.
#[derive(SimpleObject, Clone, Debug)]
pub struct ProfileChange {
    /// CREATED | UPDATED | MERGED | ERASED
    pub kind: String,
    pub profile_id: ID,
    /// The profile now (for MERGED, the profile it was merged into); null once erased.
    pub profile: Option<Profile>,
    /// For MERGED: the profile it was merged into.
    pub merged_into: Option<ID>,
}

fn expired() -> async_graphql::Error {
    service_error(ServiceError::Unauthenticated(
        "the access token expired: sign in again and open a new socket".to_owned(),
    ))
}

fn missed(text: String, count: Option<u64>) -> async_graphql::Error {
    async_graphql::Error::new(format!(
        "{text}; this subscription goes on, resynchronize from the history if you need every change"
    ))
    .extend_with(|_, extensions| {
        extensions.set("code", "RATE_LIMITED");
        if let Some(count) = count {
            extensions.set("missed", count);
        }
    })
}

/// The committed notices of the subscriber's own tenant, for a subscription field: checks that
/// the principal holds `permission`, counts the subscription against the tenant's limit, and
/// yields every notice of the principal's tenant (checked on each one), an error item (code
/// RATE_LIMITED, `extensions.missed`) when the subscriber fell behind, and ends with an
/// UNAUTHENTICATED error when the socket's access token expires.
///
/// The stream holds the subscription's permit: dropping it frees the place.
pub(super) fn tenant_notices(
    ctx: &Context<'_>,
    permission: Permission,
) -> Result<(
    Principal,
    impl Stream<Item = Result<Arc<LiveNotice>>> + Send + 'static,
)> {
    let env = Env::of(ctx)?;
    let principal = require_permission(env.principal()?, permission)
        .gql()?
        .clone();
    let session = ctx.data::<SocketSession>().map_err(|_| {
        service_error(ServiceError::bad_input(
            "subscription",
            "subscriptions are served over the WebSocket endpoint /graphql/ws",
        ))
    })?;
    let expires_at = session.expires_at;
    let (permit, receiver) = env
        .state
        .realtime
        .subscribe(env.state, principal.tenant_id)
        .map_err(|refused| {
            async_graphql::Error::new(refused.to_string())
                .extend_with(|_, extensions| extensions.set("code", "RATE_LIMITED"))
        })?;
    let tenant_id = principal.tenant_id;
    struct Reading {
        receiver: tokio::sync::broadcast::Receiver<LiveItem>,
        _permit: Permit,
        done: bool,
    }
    let reading = Reading {
        receiver,
        _permit: permit,
        done: false,
    };
    let stream = futures::stream::unfold(reading, move |mut reading| async move {
        if reading.done {
            return None;
        }
        let deadline = async {
            match expires_at {
                Some(at) => {
                    let left = (at - Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(deadline);
        loop {
            let received = tokio::select! {
                received = reading.receiver.recv() => received,
                () = &mut deadline => {
                    reading.done = true;
                    return Some((Err(expired()), reading));
                }
            };
            let item = match received {
                Ok(LiveItem::Notice(notice)) if notice.notice.tenant_id() == tenant_id => {
                    if expires_at.is_some_and(|at| at <= Utc::now()) {
                        reading.done = true;
                        Err(expired())
                    } else {
                        Ok(notice)
                    }
                }
                Ok(LiveItem::Notice(_)) => continue,
                Ok(LiveItem::Gap(text)) => Err(missed(text, None)),
                Err(RecvError::Lagged(count)) => Err(missed(
                    format!("{count} notices were lost: this subscriber fell behind"),
                    Some(count),
                )),
                Err(RecvError::Closed) => return None,
            };
            return Some((item, reading));
        }
    });
    Ok((principal, stream))
}

/// Parses an optional ID filter; an ID that is not a UUID matches nothing and is refused.
fn id_filter(field: &str, id: Option<ID>) -> Result<Option<Uuid>> {
    id.map(|id| {
        Uuid::parse_str(id.trim()).map_err(|_| {
            service_error(ServiceError::bad_input(
                field,
                format!("{field} is not an ID"),
            ))
        })
    })
    .transpose()
}

#[derive(Default)]
pub struct LiveSubscription;

#[Subscription]
impl LiveSubscription {
    /// Profiles created, updated, merged away or erased; only `profileId`'s when given.
    async fn profile_updated(
        &self,
        ctx: &Context<'_>,
        profile_id: Option<ID>,
    ) -> Result<impl Stream<Item = Result<ProfileChange>>> {
        let filter = id_filter("profileId", profile_id)?;
        let (principal, notices) = tenant_notices(ctx, Permission::ProfilesRead)?;
        Ok(notices.filter_map(move |item| {
            let change = item.map(|live| {
                let Notice::ProfileChanged {
                    profile_id, kind, ..
                } = &live.notice
                else {
                    return None;
                };
                if filter.is_some_and(|wanted| wanted != *profile_id) {
                    return None;
                }
                let merged_into = match kind {
                    crate::service::bus::ProfileChangeKind::Merged { into } => {
                        Some(ID(into.to_string()))
                    }
                    _ => None,
                };
                Some(ProfileChange {
                    kind: kind.as_str().to_owned(),
                    profile_id: ID(profile_id.to_string()),
                    profile: live.profile(&principal).map(Profile::from),
                    merged_into,
                })
            });
            std::future::ready(change.transpose())
        }))
    }

    /// Events as they are stored; only those named `name` when given.
    async fn event_ingested(
        &self,
        ctx: &Context<'_>,
        name: Option<String>,
    ) -> Result<impl Stream<Item = Result<Event>>> {
        let (principal, notices) = tenant_notices(ctx, Permission::ProfilesRead)?;
        Ok(notices.filter_map(move |item| {
            let event = item.map(|live| {
                let Notice::EventIngested {
                    name: event_name, ..
                } = &live.notice
                else {
                    return None;
                };
                if name.is_some() && *event_name != name {
                    return None;
                }
                live.event(&principal).map(Event::from)
            });
            std::future::ready(event.transpose())
        }))
    }

    /// Entries into and exits from segments; only `segmentId`'s when given.
    async fn segment_membership_changed(
        &self,
        ctx: &Context<'_>,
        segment_id: Option<ID>,
    ) -> Result<impl Stream<Item = Result<SegmentMembershipChange>>> {
        let filter = id_filter("segmentId", segment_id)?;
        let (_, notices) = tenant_notices(ctx, Permission::ProfilesRead)?;
        Ok(notices.filter_map(move |item| {
            let change = item.map(|live| match &live.notice {
                Notice::SegmentMembership {
                    segment_id,
                    profile_id,
                    entered,
                    at,
                    reason,
                    ..
                } if filter.is_none_or(|wanted| wanted == *segment_id) => {
                    Some(SegmentMembershipChange {
                        segment_id: ID(segment_id.to_string()),
                        profile_id: ID(profile_id.to_string()),
                        entered: *entered,
                        at: *at,
                        reason: reason.clone(),
                    })
                }
                _ => None,
            });
            std::future::ready(change.transpose())
        }))
    }

    /// Profiles moving into a lifecycle stage.
    async fn lifecycle_stage_changed(
        &self,
        ctx: &Context<'_>,
    ) -> Result<impl Stream<Item = Result<LifecycleTransition>>> {
        let (_, notices) = tenant_notices(ctx, Permission::ProfilesRead)?;
        Ok(notices.filter_map(|item| {
            let transition = item.map(|live| match &live.notice {
                Notice::StageTransition {
                    profile_id,
                    from,
                    to: Some(to),
                    at,
                    reason,
                    ..
                } => Some(LifecycleTransition {
                    profile_id: ID(profile_id.to_string()),
                    from: from.clone(),
                    to: to.clone(),
                    at: *at,
                    reason: reason.clone(),
                }),
                _ => None,
            });
            std::future::ready(transition.transpose())
        }))
    }
}
