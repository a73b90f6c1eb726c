//! What the in-memory evaluator knows of a profile ([`ProfileFacts`]), loaded for a few profiles
//! at once. The mapping follows the module docs of `store::conditions`, so that a condition gives
//! the same answer in memory as in SQL.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use domain::condition::{Attribute, EventFact, ProfileFacts};
use sea_orm::sea_query::ArrayType;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use serde_json::{json, Value as Json};
use uuid::Uuid;

use super::conditions::instant_fact_text;
use super::entity::{consents, events, profile_state};
use super::{StoreResult, TenantTx};

/// What to load with the facts: which events, and whether the consents and the traits.
#[derive(Debug, Clone, Default)]
pub struct EventNeeds {
    /// The profiles' consents: some condition reads a consent.
    pub consents: bool,
    /// Every event, whatever its name.
    pub any: bool,
    /// Events with these names.
    pub names: BTreeSet<String>,
    /// Only events at or after this instant; `None` for all time.
    pub since: Option<DateTime<Utc>>,
    /// No condition reads a trait: the traits are not read, and the facts hold none.
    pub without_traits: bool,
}

impl EventNeeds {
    fn none(&self) -> bool {
        !self.any && self.names.is_empty()
    }
}

/// The facts of these live profiles (merged-away profiles are left out).
pub async fn load(
    tx: &TenantTx,
    ids: &[Uuid],
    needs: &EventNeeds,
) -> StoreResult<HashMap<Uuid, ProfileFacts>> {
    let tenant = tx.tenant_id().as_uuid();
    let mut facts: HashMap<Uuid, ProfileFacts> = HashMap::with_capacity(ids.len());
    // Only the profile columns the facts are made of: not the trait clock, the channels or the
    // times of the row, and not the traits when no condition reads one (the lifecycle model and
    // every segment about events, after a batch of tracks).
    let skipped = needs
        .without_traits
        .then_some(profile_state::Column::Traits);
    for chunk in ids.chunks(500) {
        let rows = if tx.backend() == super::Backend::Postgres {
            // One primary-key probe per id (see `store::keyed`): as an `IN` list this read every
            // profile of the tenant when `profiles` had no statistics, 11 ms a batch at 10,000
            // profiles inside the write path's locks, growing with the tenant.
            let keys = vec![super::keyed::KeyColumn::Uuid("id", chunk.to_vec())];
            super::keyed::models_of::<profile_state::Entity>(
                tx,
                &super::select_list::<profile_state::Entity>(skipped, "{}", tx.backend()),
                keys,
                super::keyed::Probe::One,
            )
            .await?
            .into_iter()
            .filter(|state| state.merged_into.is_none())
            .collect()
        } else {
            let mut query = profile_state::Entity::find()
                .filter(profile_state::Column::TenantId.eq(tenant))
                .filter(profile_state::Column::Id.is_in(chunk.iter().copied()))
                .filter(profile_state::Column::MergedInto.is_null());
            if let Some(skipped) = skipped {
                query = super::without_json_column(query, skipped, "{}", tx.backend());
            }
            query.all(tx.conn()).await?
        };
        for state in rows {
            facts.insert(state.id, of_state(state));
        }
        if needs.consents {
            let consent_rows = consents::Entity::find()
                .filter(consents::Column::TenantId.eq(tenant))
                .filter(super::any_of(
                    tx.backend(),
                    consents::Column::ProfileId,
                    ArrayType::Uuid,
                    chunk.iter().copied(),
                ))
                .all(tx.conn())
                .await?;
            for consent in consent_rows {
                if let Some(profile) = facts.get_mut(&consent.profile_id) {
                    profile.consents.insert(consent.purpose, consent.granted);
                }
            }
        }
        if needs.none() {
            continue;
        }
        let mut query = events::Entity::find()
            .filter(events::Column::TenantId.eq(tenant))
            .filter(super::any_of(
                tx.backend(),
                events::Column::ProfileId,
                ArrayType::Uuid,
                chunk.iter().copied(),
            ));
        if !needs.any {
            query = query.filter(super::any_of(
                tx.backend(),
                events::Column::Name,
                ArrayType::String,
                needs.names.iter().cloned(),
            ));
        }
        if let Some(since) = needs.since {
            query = query.filter(events::Column::Timestamp.gte(since));
        }
        // Only what conditions read: not the context, ids or channels of the events.
        let rows: Vec<(Uuid, Option<String>, DateTime<Utc>, Json)> = query
            .select_only()
            .column(events::Column::ProfileId)
            .column(events::Column::Name)
            .column(events::Column::Timestamp)
            .column(events::Column::Properties)
            .into_tuple()
            .all(tx.conn())
            .await?;
        for (profile_id, name, timestamp, properties) in rows {
            if let Some(profile) = facts.get_mut(&profile_id) {
                profile.events.push(event_fact(name, timestamp, properties));
            }
        }
    }
    Ok(facts)
}

/// The facts of a profile's stored state, without its events and consents (which the caller
/// adds): what [`load`] makes of each row it reads, and [`of_new_profile`] of a row about to be
/// written.
fn of_state(state: profile_state::Model) -> ProfileFacts {
    let mut profile = ProfileFacts {
        traits: match state.traits {
            Json::Object(map) => map,
            _ => Default::default(),
        },
        stage: state.stage,
        ..ProfileFacts::default()
    };
    let attributes = &mut profile.attributes;
    attributes.insert(
        Attribute::FirstSeenAt,
        Json::String(instant_fact_text(state.first_seen_at)),
    );
    attributes.insert(
        Attribute::LastSeenAt,
        Json::String(instant_fact_text(state.last_seen_at)),
    );
    attributes.insert(Attribute::EventCount, json!(state.event_count));
    attributes.insert(Attribute::TotalRevenue, json!(state.total_revenue));
    attributes.insert(Attribute::OrderCount, json!(state.order_count));
    attributes.insert(Attribute::ChurnRisk, json!(state.churn_risk));
    let rfm = [
        (Attribute::RfmRecency, state.rfm_recency),
        (Attribute::RfmFrequency, state.rfm_frequency),
        (Attribute::RfmMonetary, state.rfm_monetary),
    ];
    for (attribute, value) in rfm {
        if let Some(value) = value {
            attributes.insert(attribute, json!(value));
        }
    }
    if let (Some(r), Some(f), Some(m)) =
        (state.rfm_recency, state.rfm_frequency, state.rfm_monetary)
    {
        attributes.insert(
            Attribute::RfmScore,
            json!(i64::from(r) * 100 + i64::from(f) * 10 + i64::from(m)),
        );
    }
    profile
}

/// The facts of the profile the write path is about to create as `row`, with these order
/// totals: what [`load`] reads back once it is written, every computed attribute at the
/// column's default (no stage, no RFM scores, no churn risk). Events and consents are the
/// caller's to add.
pub fn of_new_profile(
    row: &super::ingest::ProfileRow,
    order_count: i64,
    total_revenue: f64,
) -> ProfileFacts {
    of_state(profile_state::Model {
        tenant_id: row.tenant_id,
        id: row.id,
        merged_into: None,
        traits: row.traits.clone(),
        first_seen_at: row.first_seen_at,
        last_seen_at: row.last_seen_at,
        event_count: row.event_count,
        stage: None,
        stage_since: None,
        total_revenue,
        order_count,
        mean_gap_seconds: None,
        rfm_recency: None,
        rfm_frequency: None,
        rfm_monetary: None,
        churn_risk: false,
    })
}

/// An event as conditions see it.
pub fn event_fact(name: Option<String>, timestamp: DateTime<Utc>, properties: Json) -> EventFact {
    EventFact {
        // A nameless event (identify, an unnamed page) counts only for `$any`, and no condition
        // can name the empty string.
        name: name.unwrap_or_default(),
        timestamp,
        properties: match properties {
            Json::Object(map) => map,
            _ => Default::default(),
        },
    }
}
