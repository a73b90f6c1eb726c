//! The privacy section: export and erasure of a person (PRIVACY_MANAGE), the tenant's privacy
//! settings, and the consent history of a profile.

use async_graphql::{Context, InputObject, Json, Object, Result, SimpleObject, ID};
use chrono::{DateTime, Utc};
use serde_json::Value;

use super::accounts::{Env, ServiceResultExt};
use crate::service::privacy;

/// What an erasure deleted. The contract's fields first; the rest says what else was done.
#[derive(SimpleObject, Clone, Debug)]
pub struct ErasureReceipt {
    pub profile_id: ID,
    pub events_deleted: i32,
    pub identities_deleted: i32,
    pub erased_at: DateTime<Utc>,
    /// Every id the person had, merged profiles included.
    pub profile_ids: Vec<ID>,
    /// Rows deleted over all tables, profiles included.
    pub rows_deleted: i32,
    /// Data keys destroyed: what they sealed is unreadable everywhere, old backups included.
    pub keys_destroyed: i32,
    /// Identifiers kept as blind indexes only, so that they never create a profile again.
    pub identifiers_suppressed: i32,
}

fn count(value: u64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

impl From<privacy::ErasureReceipt> for ErasureReceipt {
    fn from(receipt: privacy::ErasureReceipt) -> Self {
        ErasureReceipt {
            profile_id: ID(receipt.profile_id.to_string()),
            events_deleted: count(receipt.events_deleted),
            identities_deleted: count(receipt.identities_deleted),
            erased_at: receipt.erased_at,
            profile_ids: receipt
                .profile_ids
                .iter()
                .map(|id| ID(id.to_string()))
                .collect(),
            rows_deleted: count(receipt.rows_deleted),
            keys_destroyed: count(receipt.keys_destroyed),
            identifiers_suppressed: count(receipt.identifiers_suppressed),
        }
    }
}

/// A tenant's privacy settings.
#[derive(SimpleObject, Clone, Debug)]
pub struct PrivacySettings {
    /// Trait and property keys holding personal data beyond the built-in ones (email, phone,
    /// name, firstName, lastName, first_name, last_name, address, birthday, username, ip, ssn).
    pub pii_traits: Vec<String>,
    /// The consent purposes campaigns may name.
    pub consent_purposes: Vec<String>,
    /// Events older than this many days are purged; null keeps them.
    pub event_retention_days: Option<i32>,
}

#[derive(InputObject, Clone, Debug)]
pub struct PrivacySettingsInput {
    pub pii_traits: Vec<String>,
    pub consent_purposes: Vec<String>,
    pub event_retention_days: Option<i32>,
}

impl From<privacy::PrivacySettings> for PrivacySettings {
    fn from(settings: privacy::PrivacySettings) -> Self {
        PrivacySettings {
            pii_traits: settings.pii_traits,
            consent_purposes: settings.consent_purposes,
            event_retention_days: settings
                .event_retention_days
                .map(|days| i32::try_from(days).unwrap_or(i32::MAX)),
        }
    }
}

/// One change of a consent: what, who or what did it, when.
#[derive(SimpleObject, Clone, Debug)]
pub struct ConsentChange {
    pub purpose: String,
    pub granted: bool,
    /// `message`, `api` or `unsubscribe link`.
    pub source: String,
    /// The user or api key, when a principal made the change.
    pub actor: Option<String>,
    pub message_id: Option<String>,
    pub at: DateTime<Utc>,
}

impl From<privacy::ConsentChange> for ConsentChange {
    fn from(change: privacy::ConsentChange) -> Self {
        ConsentChange {
            purpose: change.purpose,
            granted: change.granted,
            source: change.source,
            actor: change.actor,
            message_id: change.message_id,
            at: change.at,
        }
    }
}

/// The consent history of a profile, for `Profile.consentHistory`.
pub(super) async fn consent_history(
    ctx: &Context<'_>,
    profile_id: uuid::Uuid,
) -> Result<Vec<ConsentChange>> {
    let env = Env::of(ctx)?;
    Ok(
        privacy::consent_history(env.state, env.principal()?, profile_id)
            .await
            .gql()?
            .into_iter()
            .map(ConsentChange::from)
            .collect(),
    )
}

#[derive(Default)]
pub struct PrivacyQuery;

#[Object]
impl PrivacyQuery {
    /// The tenant's privacy settings (PRIVACY_MANAGE).
    async fn privacy_settings(&self, ctx: &Context<'_>) -> Result<PrivacySettings> {
        let env = Env::of(ctx)?;
        privacy::get_settings(env.state, env.principal()?)
            .await
            .gql()
            .map(PrivacySettings::from)
    }
}

#[derive(Default)]
pub struct PrivacyMutation;

#[Object]
impl PrivacyMutation {
    /// Everything stored about one person, as one JSON document.
    async fn export_profile(&self, ctx: &Context<'_>, id: ID) -> Result<Json<Value>> {
        let env = Env::of(ctx)?;
        privacy::export(env.state, env.principal()?, env.meta(), &id)
            .await
            .gql()
            .map(Json)
    }

    /// Deletes the profile, its identities, events, memberships, consents and queued emails.
    /// With `suppress`, the person's identifiers (kept as blind indexes only) never create a
    /// profile again.
    async fn erase_profile(
        &self,
        ctx: &Context<'_>,
        id: ID,
        #[graphql(default = false)] suppress: bool,
    ) -> Result<ErasureReceipt> {
        let env = Env::of(ctx)?;
        privacy::erase(env.state, env.principal()?, env.meta(), &id, suppress)
            .await
            .gql()
            .map(ErasureReceipt::from)
    }

    /// Replaces the tenant's privacy settings (PRIVACY_MANAGE).
    async fn set_privacy_settings(
        &self,
        ctx: &Context<'_>,
        input: PrivacySettingsInput,
    ) -> Result<PrivacySettings> {
        let env = Env::of(ctx)?;
        let settings = privacy::PrivacySettings {
            pii_traits: input.pii_traits,
            consent_purposes: input.consent_purposes,
            event_retention_days: match input.event_retention_days {
                None => None,
                Some(days) => Some(u32::try_from(days).map_err(|_| {
                    super::service_error(crate::service::ServiceError::bad_input(
                        "input.eventRetentionDays",
                        "eventRetentionDays must be at least 1 (or null to keep events)",
                    ))
                })?),
            },
        };
        privacy::set_settings(env.state, env.principal()?, env.meta(), settings)
            .await
            .gql()
            .map(PrivacySettings::from)
    }
}
