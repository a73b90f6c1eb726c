//! Batching of the fields a profile resolves from other tables (DataLoader).
//!
//! Guarantees: a list of profiles (a `profiles` page, a segment's members, a preview) that selects
//! `identities`, `stage`, `segments`, `consents`, `mergedIds`, `groups`, `attributes` or the first page of `events` reads each of them with one
//! statement for the whole list, not one per profile; the loads run as the request's principal
//! and, in a read-only request, inside the request's one read transaction (`store::ReadScope`).
//! One loader per request context, made when a profile first asks; nothing is cached between
//! requests.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use async_graphql::dataloader::{DataLoader, Loader};
use async_graphql::{Context, Error, Result};
use uuid::Uuid;

use super::accounts::Env;
use super::service_error;
use crate::auth::Principal;
use crate::service::pagination::Page;
use crate::service::ReadScope;
use crate::service::{analytics, lifecycle, profiles, segments, AppState};

/// The slot of a request's loader, in its [`super::RequestContext`]: empty until a resolver asks.
#[derive(Clone, Default)]
pub struct ProfileLoaderSlot(Arc<OnceLock<DataLoader<ProfileFields>>>);

impl fmt::Debug for ProfileLoaderSlot {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("ProfileLoaderSlot")
    }
}

/// The loader of the request `ctx` belongs to.
pub(super) fn profile_loader<'a>(ctx: &'a Context<'_>) -> Result<&'a DataLoader<ProfileFields>> {
    let env = Env::of(ctx)?;
    let principal = env.principal()?;
    Ok(env.request.loaders.0.get_or_init(|| {
        let fields = ProfileFields {
            state: env.state.clone(),
            principal: principal.cloned(),
        };
        // The batch runs in a task of its own: it joins the request's read scope, if any.
        let scope = ReadScope::current();
        DataLoader::new(fields, move |work| {
            let scope = scope.clone();
            tokio::spawn(async move {
                match scope {
                    Some(scope) => scope.run(work).await,
                    None => work.await,
                }
            })
        })
    }))
}

/// The `key`'s value: batched with the other profiles of the list it is part of, or, for a
/// profile that is not in a list (`profile(id)`), read at once, without the loader's wait for
/// more keys.
pub(super) async fn load<K>(
    ctx: &Context<'_>,
    key: K,
) -> Result<Option<<ProfileFields as Loader<K>>::Value>>
where
    K: Send + Sync + std::hash::Hash + Eq + Clone + 'static,
    ProfileFields: Loader<K, Error = Error>,
{
    let loader = profile_loader(ctx)?;
    if in_list(ctx) {
        loader.load_one(key).await
    } else {
        let mut found = loader.loader().load(std::slice::from_ref(&key)).await?;
        Ok(found.remove(&key))
    }
}

/// Whether the field being resolved belongs to an item of a list.
fn in_list(ctx: &Context<'_>) -> bool {
    let is_index = |segment: &async_graphql::QueryPathSegment<'_>| {
        matches!(segment, async_graphql::QueryPathSegment::Index(_))
    };
    ctx.path_node.is_some_and(|node| {
        is_index(&node.segment) || node.parents().any(|parent| is_index(&parent.segment))
    })
}

/// Loads per-profile fields for a batch of profile ids, as one principal.
pub struct ProfileFields {
    state: AppState,
    principal: Option<Principal>,
}

/// Keys: the profile whose field is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IdentitiesOf(pub Uuid);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StageOf(pub Uuid);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SegmentsOf(pub Uuid);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsentsOf(pub Uuid);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MergedIdsOf(pub Uuid);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GroupsOf(pub Uuid);
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttributesOf(pub Uuid);
/// The first page of a profile's timeline, of `first` events, with what the reader selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FirstEventsOf {
    pub profile_id: Uuid,
    pub first: Option<i32>,
    pub wants: profiles::EventPageWants,
}

/// Re-keys a service answer by profile id to the loader's key type.
fn keyed<K: std::hash::Hash + Eq, V>(
    found: HashMap<Uuid, V>,
    key: impl Fn(Uuid) -> K,
) -> HashMap<K, V> {
    found
        .into_iter()
        .map(|(id, value)| (key(id), value))
        .collect()
}

/// A loader whose batch is one service call over the profile ids, answering by profile id.
macro_rules! by_profile_id {
    ($key:ident, $value:ty, $service:path) => {
        impl Loader<$key> for ProfileFields {
            type Value = $value;
            type Error = Error;

            async fn load(&self, keys: &[$key]) -> Result<HashMap<$key, Self::Value>> {
                let ids: Vec<Uuid> = keys.iter().map(|key| key.0).collect();
                $service(&self.state, self.principal.as_ref(), &ids)
                    .await
                    .map(|found| keyed(found, $key))
                    .map_err(service_error)
            }
        }
    };
}

by_profile_id!(IdentitiesOf, Vec<profiles::Identity>, profiles::identities);
by_profile_id!(StageOf, String, lifecycle::current_stages);
by_profile_id!(SegmentsOf, Vec<segments::Segment>, segments::of_profiles);
by_profile_id!(ConsentsOf, Vec<profiles::Consent>, profiles::consents);
by_profile_id!(MergedIdsOf, Vec<Uuid>, profiles::merged_ids);
by_profile_id!(GroupsOf, Vec<profiles::Group>, profiles::groups);
by_profile_id!(
    AttributesOf,
    analytics::CustomerAttributes,
    analytics::attributes
);

impl Loader<FirstEventsOf> for ProfileFields {
    type Value = Page<profiles::Event>;
    type Error = Error;

    async fn load(&self, keys: &[FirstEventsOf]) -> Result<HashMap<FirstEventsOf, Self::Value>> {
        // The profiles of one list ask alike; keys that differ in size or selection (aliases)
        // are read apart.
        let mut alike: HashMap<(Option<i32>, profiles::EventPageWants), Vec<Uuid>> = HashMap::new();
        for key in keys {
            alike
                .entry((key.first, key.wants))
                .or_default()
                .push(key.profile_id);
        }
        let mut found = HashMap::with_capacity(keys.len());
        for ((first, wants), ids) in alike {
            let pages = profiles::first_event_pages(
                &self.state,
                self.principal.as_ref(),
                &ids,
                first,
                wants,
            )
            .await
            .map_err(service_error)?;
            found.extend(pages.into_iter().map(|(profile_id, page)| {
                let key = FirstEventsOf {
                    profile_id,
                    first,
                    wants,
                };
                (key, page)
            }));
        }
        Ok(found)
    }
}
