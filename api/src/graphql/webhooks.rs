//! Webhooks: registering endpoints, pausing and deleting them, and reading their delivery log.

use async_graphql::{Context, Enum, InputObject, Json, Object, Result, SimpleObject, ID};
use chrono::{DateTime, Utc};

use super::accounts::{Env, ServiceResultExt};
use super::types::PageInfo;
use crate::service::pagination::Page;
use crate::service::webhooks;

/// What a webhook subscribes to. Payloads name topics in dotted form: `segment.membership`,
/// `lifecycle.transition`, `event.ingested`, `profile.changed`.
#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum WebhookTopic {
    SegmentMembership,
    LifecycleTransition,
    EventIngested,
    ProfileChanged,
}

impl From<WebhookTopic> for webhooks::Topic {
    fn from(topic: WebhookTopic) -> Self {
        match topic {
            WebhookTopic::SegmentMembership => webhooks::Topic::SegmentMembership,
            WebhookTopic::LifecycleTransition => webhooks::Topic::LifecycleTransition,
            WebhookTopic::EventIngested => webhooks::Topic::EventIngested,
            WebhookTopic::ProfileChanged => webhooks::Topic::ProfileChanged,
        }
    }
}

impl From<webhooks::Topic> for WebhookTopic {
    fn from(topic: webhooks::Topic) -> Self {
        match topic {
            webhooks::Topic::SegmentMembership => WebhookTopic::SegmentMembership,
            webhooks::Topic::LifecycleTransition => WebhookTopic::LifecycleTransition,
            webhooks::Topic::EventIngested => WebhookTopic::EventIngested,
            webhooks::Topic::ProfileChanged => WebhookTopic::ProfileChanged,
        }
    }
}

#[derive(InputObject, Debug)]
pub struct CreateWebhookInput {
    /// `https://` only (see `docs/webhooks.md`); no credentials in the URL.
    pub url: String,
    pub topics: Vec<WebhookTopic>,
    /// Only membership changes of this segment (narrows SEGMENT_MEMBERSHIP only).
    pub segment_id: Option<ID>,
    /// Only events of this name (narrows EVENT_INGESTED only).
    pub event_name: Option<String>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Webhook {
    pub id: ID,
    pub url: String,
    pub topics: Vec<WebhookTopic>,
    pub segment_id: Option<ID>,
    pub event_name: Option<String>,
    pub active: bool,
    pub created_at: DateTime<Utc>,
}

impl From<webhooks::Webhook> for Webhook {
    fn from(webhook: webhooks::Webhook) -> Self {
        Webhook {
            id: ID(webhook.id.to_string()),
            url: webhook.url,
            topics: webhook.topics.into_iter().map(Into::into).collect(),
            segment_id: webhook.segment_id.map(|id| ID(id.to_string())),
            event_name: webhook.event_name,
            active: webhook.active,
            created_at: webhook.created_at,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct CreatedWebhook {
    pub webhook: Webhook,
    /// The signing secret, shown here once and never again.
    pub secret: String,
}

#[derive(Enum, Copy, Clone, Debug, PartialEq, Eq)]
pub enum WebhookDeliveryStatus {
    Queued,
    Sent,
    Failed,
}

/// One attempt to deliver.
#[derive(SimpleObject, Clone, Debug)]
pub struct WebhookAttempt {
    pub at: DateTime<Utc>,
    /// The HTTP status of the answer, when there was an answer.
    pub status_code: Option<i32>,
    pub error: Option<String>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct WebhookDelivery {
    pub id: ID,
    pub webhook_id: ID,
    pub topic: Option<WebhookTopic>,
    /// The JSON body sent.
    pub payload: Json<serde_json::Value>,
    pub status: WebhookDeliveryStatus,
    pub attempts: i32,
    /// When the next attempt is due, while QUEUED.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    /// Every attempt, oldest first.
    pub attempt_log: Vec<WebhookAttempt>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

impl From<webhooks::Delivery> for WebhookDelivery {
    fn from(delivery: webhooks::Delivery) -> Self {
        WebhookDelivery {
            id: ID(delivery.id.to_string()),
            webhook_id: ID(delivery.webhook_id.to_string()),
            topic: delivery.topic.map(Into::into),
            payload: Json(delivery.payload),
            status: match delivery.status {
                webhooks::DeliveryStatus::Queued => WebhookDeliveryStatus::Queued,
                webhooks::DeliveryStatus::Sent => WebhookDeliveryStatus::Sent,
                webhooks::DeliveryStatus::Failed => WebhookDeliveryStatus::Failed,
            },
            attempts: delivery.attempts,
            next_attempt_at: delivery.next_attempt_at,
            last_status_code: delivery.last_status_code,
            last_error: delivery.last_error,
            attempt_log: delivery
                .attempt_log
                .into_iter()
                .map(|attempt| WebhookAttempt {
                    at: attempt.at,
                    status_code: attempt.status_code,
                    error: attempt.error,
                })
                .collect(),
            created_at: delivery.created_at,
            sent_at: delivery.sent_at,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct WebhookDeliveryEdge {
    pub node: WebhookDelivery,
    pub cursor: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct WebhookDeliveryConnection {
    pub edges: Vec<WebhookDeliveryEdge>,
    pub page_info: PageInfo,
    pub total_count: i32,
}

impl From<Page<webhooks::Delivery>> for WebhookDeliveryConnection {
    fn from(page: Page<webhooks::Delivery>) -> Self {
        let page_info = PageInfo::of(&page);
        WebhookDeliveryConnection {
            total_count: super::types::total_count(page.total_count),
            edges: page
                .items
                .into_iter()
                .map(|(delivery, cursor)| WebhookDeliveryEdge {
                    node: delivery.into(),
                    cursor,
                })
                .collect(),
            page_info,
        }
    }
}

#[derive(Default)]
pub struct WebhooksQuery;

#[Object]
impl WebhooksQuery {
    /// The tenant's webhooks (API_KEYS_MANAGE).
    async fn webhooks(&self, ctx: &Context<'_>) -> Result<Vec<Webhook>> {
        let env = Env::of(ctx)?;
        Ok(webhooks::list(env.state, env.principal()?)
            .await
            .gql()?
            .into_iter()
            .map(Webhook::from)
            .collect())
    }

    /// The delivery log of one webhook, newest first (API_KEYS_MANAGE).
    async fn webhook_deliveries(
        &self,
        ctx: &Context<'_>,
        webhook_id: ID,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<WebhookDeliveryConnection> {
        let env = Env::of(ctx)?;
        webhooks::deliveries(
            env.state,
            env.principal()?,
            &webhook_id,
            first,
            after.as_deref(),
        )
        .await
        .gql()
        .map(WebhookDeliveryConnection::from)
    }
}

#[derive(Default)]
pub struct WebhooksMutation;

#[Object]
impl WebhooksMutation {
    /// Registers a webhook (API_KEYS_MANAGE). The signing secret is returned here once.
    async fn create_webhook(
        &self,
        ctx: &Context<'_>,
        input: CreateWebhookInput,
    ) -> Result<CreatedWebhook> {
        let env = Env::of(ctx)?;
        let (webhook, secret) = webhooks::create(
            env.state,
            env.principal()?,
            env.meta(),
            webhooks::CreateWebhookCommand {
                url: input.url,
                topics: input.topics.into_iter().map(Into::into).collect(),
                segment_id: input.segment_id.map(|id| id.0),
                event_name: input.event_name,
            },
        )
        .await
        .gql()?;
        Ok(CreatedWebhook {
            webhook: webhook.into(),
            secret,
        })
    }

    /// Deletes a webhook and its delivery log; queued deliveries are dropped.
    async fn delete_webhook(&self, ctx: &Context<'_>, id: ID) -> Result<bool> {
        let env = Env::of(ctx)?;
        webhooks::delete(env.state, env.principal()?, env.meta(), &id)
            .await
            .gql()
    }

    /// Pauses (`active: false`) or resumes a webhook.
    async fn set_webhook_active(&self, ctx: &Context<'_>, id: ID, active: bool) -> Result<Webhook> {
        let env = Env::of(ctx)?;
        webhooks::set_active(env.state, env.principal()?, env.meta(), &id, active)
            .await
            .gql()
            .map(Webhook::from)
    }
}
