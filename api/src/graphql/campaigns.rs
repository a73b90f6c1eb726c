//! The campaigns section: campaigns with their delivery counts, campaign emails (addresses masked
//! without PII_READ), the tenant's frequency cap, and the `emailDeliveryUpdated` subscription.

use async_graphql::{
    ComplexObject, Context, Enum, InputObject, Object, Result, SimpleObject, Subscription, ID,
};
use chrono::{DateTime, Utc};
use domain::Permission;
use futures::{Stream, StreamExt};
use uuid::Uuid;

use super::accounts::{Env, ServiceResultExt};
use super::service_error;
use super::types::{total_count, PageInfo};
use crate::service::bus::Notice;
use crate::service::campaigns;
use crate::service::pagination::Page;
use crate::service::ServiceError;

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum CampaignStatus {
    Draft,
    Active,
    Paused,
}

impl From<campaigns::Status> for CampaignStatus {
    fn from(status: campaigns::Status) -> Self {
        match status {
            campaigns::Status::Draft => CampaignStatus::Draft,
            campaigns::Status::Active => CampaignStatus::Active,
            campaigns::Status::Paused => CampaignStatus::Paused,
        }
    }
}

impl From<CampaignStatus> for campaigns::Status {
    fn from(status: CampaignStatus) -> Self {
        match status {
            CampaignStatus::Draft => campaigns::Status::Draft,
            CampaignStatus::Active => campaigns::Status::Active,
            CampaignStatus::Paused => campaigns::Status::Paused,
        }
    }
}

/// Exactly one field is set.
#[derive(InputObject, Debug)]
pub struct CampaignTriggerInput {
    /// Emails a profile when it enters this segment.
    pub segment_entered: Option<ID>,
    /// Emails a profile when it moves into this lifecycle stage (its key).
    pub stage_entered: Option<String>,
    /// Emails a profile when an event of this name is stored for it.
    pub event: Option<String>,
    /// Emails every current member of this segment when the campaign becomes ACTIVE.
    pub broadcast_segment: Option<ID>,
}

/// subject/textBody/htmlBody are templates over {{ profile.traits.* }}, {{ profile.id }}, {{ unsubscribe_url }}.
#[derive(InputObject, Debug)]
pub struct CampaignInput {
    pub name: String,
    pub trigger: CampaignTriggerInput,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
    /// The consent purpose that must be granted before this campaign may email someone.
    #[graphql(default_with = "Some(campaigns::DEFAULT_PURPOSE.to_owned())")]
    pub consent_purpose: Option<String>,
}

impl From<CampaignInput> for campaigns::CampaignInput {
    fn from(input: CampaignInput) -> Self {
        campaigns::CampaignInput {
            name: input.name,
            trigger: campaigns::TriggerInput {
                segment_entered: input.trigger.segment_entered.map(|id| id.0),
                stage_entered: input.trigger.stage_entered,
                event: input.trigger.event,
                broadcast_segment: input.trigger.broadcast_segment.map(|id| id.0),
            },
            subject: input.subject,
            text_body: input.text_body,
            html_body: input.html_body,
            consent_purpose: input.consent_purpose,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct CampaignTrigger {
    /// segmentEntered | stageEntered | event | broadcastSegment
    pub kind: String,
    pub segment_id: Option<ID>,
    pub stage: Option<String>,
    pub event: Option<String>,
}

impl From<&campaigns::Trigger> for CampaignTrigger {
    fn from(trigger: &campaigns::Trigger) -> Self {
        let (stage, event) = match trigger {
            campaigns::Trigger::StageEntered(stage) => (Some(stage.clone()), None),
            campaigns::Trigger::Event(event) => (None, Some(event.clone())),
            _ => (None, None),
        };
        CampaignTrigger {
            kind: trigger.kind().to_owned(),
            segment_id: trigger.segment_id().map(|id| ID(id.to_string())),
            stage,
            event,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
#[graphql(complex)]
pub struct Campaign {
    pub id: ID,
    pub name: String,
    pub status: CampaignStatus,
    pub trigger: CampaignTrigger,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
    pub consent_purpose: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[graphql(skip)]
    uuid: Uuid,
}

impl From<campaigns::Campaign> for Campaign {
    fn from(campaign: campaigns::Campaign) -> Self {
        Campaign {
            id: ID(campaign.id.to_string()),
            uuid: campaign.id,
            name: campaign.name,
            status: campaign.status.into(),
            trigger: CampaignTrigger::from(&campaign.trigger),
            subject: campaign.subject,
            text_body: campaign.text_body,
            html_body: campaign.html_body,
            consent_purpose: campaign.consent_purpose,
            created_at: campaign.created_at,
            updated_at: campaign.updated_at,
        }
    }
}

#[ComplexObject]
impl Campaign {
    /// How many of its emails are queued, sent, failed and suppressed now.
    async fn stats(&self, ctx: &Context<'_>) -> Result<DeliveryStats> {
        let env = Env::of(ctx)?;
        let stats = campaigns::stats(env.state, env.principal()?, self.uuid)
            .await
            .gql()?;
        Ok(DeliveryStats {
            queued: count(stats.queued),
            sent: count(stats.sent),
            failed: count(stats.failed),
            suppressed: count(stats.suppressed),
        })
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct DeliveryStats {
    pub queued: i32,
    pub sent: i32,
    pub failed: i32,
    pub suppressed: i32,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum DeliveryStatus {
    Queued,
    Sent,
    Failed,
    Suppressed,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct EmailDelivery {
    pub id: ID,
    pub campaign_id: Option<ID>,
    pub profile_id: Option<ID>,
    /// Masked without PII_READ.
    pub to: String,
    pub status: DeliveryStatus,
    /// Why a SUPPRESSED email was not sent: "no consent", "no email", "frequency cap".
    pub suppression_reason: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

impl From<campaigns::Delivery> for EmailDelivery {
    fn from(delivery: campaigns::Delivery) -> Self {
        let status = match delivery.status {
            "SENT" => DeliveryStatus::Sent,
            "FAILED" => DeliveryStatus::Failed,
            "SUPPRESSED" => DeliveryStatus::Suppressed,
            _ => DeliveryStatus::Queued,
        };
        EmailDelivery {
            id: ID(delivery.id.to_string()),
            campaign_id: delivery.campaign_id.map(|id| ID(id.to_string())),
            profile_id: delivery.profile_id.map(|id| ID(id.to_string())),
            to: delivery.to,
            status,
            suppression_reason: delivery.suppression_reason,
            attempts: delivery.attempts,
            last_error: delivery.last_error,
            sent_at: delivery.sent_at,
            created_at: delivery.created_at,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct EmailDeliveryEdge {
    pub node: EmailDelivery,
    pub cursor: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct EmailDeliveryConnection {
    pub edges: Vec<EmailDeliveryEdge>,
    pub page_info: PageInfo,
    pub total_count: i32,
}

impl From<Page<campaigns::Delivery>> for EmailDeliveryConnection {
    fn from(page: Page<campaigns::Delivery>) -> Self {
        let page_info = PageInfo::of(&page);
        EmailDeliveryConnection {
            total_count: total_count(page.total_count),
            page_info,
            edges: page
                .items
                .into_iter()
                .map(|(delivery, cursor)| EmailDeliveryEdge {
                    node: delivery.into(),
                    cursor,
                })
                .collect(),
        }
    }
}

/// Per-tenant campaign settings.
#[derive(SimpleObject, Clone, Debug)]
pub struct CampaignSettings {
    /// Campaign emails one profile may be sent in any 24 hours (further ones are SUPPRESSED
    /// with "frequency cap"); 0 for no limit. Default 3.
    pub daily_cap_per_profile: i32,
}

#[derive(InputObject, Debug)]
pub struct CampaignSettingsInput {
    pub daily_cap_per_profile: i32,
}

fn count(value: u64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

#[derive(Default)]
pub struct CampaignsQuery;

#[Object]
impl CampaignsQuery {
    async fn campaigns(&self, ctx: &Context<'_>) -> Result<Vec<Campaign>> {
        let env = Env::of(ctx)?;
        Ok(campaigns::list(env.state, env.principal()?)
            .await
            .gql()?
            .into_iter()
            .map(Campaign::from)
            .collect())
    }

    async fn campaign(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Campaign>> {
        let env = Env::of(ctx)?;
        Ok(campaigns::get(env.state, env.principal()?, &id)
            .await
            .gql()?
            .map(Campaign::from))
    }

    /// Campaign emails in id order, by campaign and/or profile.
    async fn email_deliveries(
        &self,
        ctx: &Context<'_>,
        campaign_id: Option<ID>,
        profile_id: Option<ID>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<EmailDeliveryConnection> {
        let env = Env::of(ctx)?;
        campaigns::deliveries(
            env.state,
            env.principal()?,
            campaign_id.as_ref().map(|id| id.as_str()),
            profile_id.as_ref().map(|id| id.as_str()),
            first,
            after.as_deref(),
        )
        .await
        .gql()
        .map(EmailDeliveryConnection::from)
    }

    async fn campaign_settings(&self, ctx: &Context<'_>) -> Result<CampaignSettings> {
        let env = Env::of(ctx)?;
        let settings = campaigns::settings(env.state, env.principal()?)
            .await
            .gql()?;
        Ok(CampaignSettings {
            daily_cap_per_profile: i32::try_from(settings.daily_cap_per_profile)
                .unwrap_or(i32::MAX),
        })
    }
}

#[derive(Default)]
pub struct CampaignsMutation;

#[Object]
impl CampaignsMutation {
    /// Creates a DRAFT campaign. Templates that do not compile are BAD_USER_INPUT with
    /// `extensions.field` naming them (`input.subject`, `input.textBody`, `input.htmlBody`).
    async fn create_campaign(&self, ctx: &Context<'_>, input: CampaignInput) -> Result<Campaign> {
        let env = Env::of(ctx)?;
        campaigns::create(env.state, env.principal()?, env.meta(), input.into())
            .await
            .gql()
            .map(Campaign::from)
    }

    /// Replaces a DRAFT or PAUSED campaign's definition (CONFLICT for an ACTIVE one).
    async fn update_campaign(
        &self,
        ctx: &Context<'_>,
        id: ID,
        input: CampaignInput,
    ) -> Result<Campaign> {
        let env = Env::of(ctx)?;
        campaigns::update(env.state, env.principal()?, env.meta(), &id, input.into())
            .await
            .gql()
            .map(Campaign::from)
    }

    /// DRAFT → ACTIVE ⇄ PAUSED. Activating a broadcast queues its email for every current member.
    async fn set_campaign_status(
        &self,
        ctx: &Context<'_>,
        id: ID,
        status: CampaignStatus,
    ) -> Result<Campaign> {
        let env = Env::of(ctx)?;
        campaigns::set_status(env.state, env.principal()?, env.meta(), &id, status.into())
            .await
            .gql()
            .map(Campaign::from)
    }

    async fn update_campaign_settings(
        &self,
        ctx: &Context<'_>,
        input: CampaignSettingsInput,
    ) -> Result<CampaignSettings> {
        let env = Env::of(ctx)?;
        let cap = u32::try_from(input.daily_cap_per_profile).map_err(|_| {
            service_error(ServiceError::bad_input(
                "input.dailyCapPerProfile",
                "dailyCapPerProfile must not be negative",
            ))
        })?;
        let settings = campaigns::update_settings(
            env.state,
            env.principal()?,
            env.meta(),
            campaigns::CampaignSettings {
                daily_cap_per_profile: cap,
            },
        )
        .await
        .gql()?;
        Ok(CampaignSettings {
            daily_cap_per_profile: i32::try_from(settings.daily_cap_per_profile)
                .unwrap_or(i32::MAX),
        })
    }
}

#[derive(Default)]
pub struct CampaignsSubscription;

#[Subscription]
impl CampaignsSubscription {
    /// Campaign emails queued, suppressed, sent or failed; only `campaignId`'s when given.
    async fn email_delivery_updated(
        &self,
        ctx: &Context<'_>,
        campaign_id: Option<ID>,
    ) -> Result<impl Stream<Item = Result<EmailDelivery>>> {
        let filter = campaign_id
            .map(|id| {
                Uuid::parse_str(id.trim()).map_err(|_| {
                    service_error(ServiceError::bad_input(
                        "campaignId",
                        "campaignId is not an ID",
                    ))
                })
            })
            .transpose()?;
        let state = Env::of(ctx)?.state.clone();
        let (principal, notices) =
            super::subscriptions::tenant_notices(ctx, Permission::ProfilesRead)?;
        Ok(notices.filter_map(move |item| {
            let state = state.clone();
            let principal = principal.clone();
            async move {
                let live = match item {
                    Ok(live) => live,
                    Err(error) => return Some(Err(error)),
                };
                let Notice::EmailDelivery {
                    delivery_id,
                    campaign_id: Some(campaign_id),
                    status,
                    ..
                } = &live.notice
                else {
                    return None;
                };
                if filter.is_some_and(|wanted| wanted != *campaign_id) {
                    return None;
                }
                campaigns::announced_delivery(&state, Some(&principal), *delivery_id, status)
                    .await
                    .gql()
                    .transpose()
                    .map(|delivery| delivery.map(EmailDelivery::from))
            }
        }))
    }
}
