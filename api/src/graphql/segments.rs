//! The segments-and-lifecycle section: segments with stored membership, previews, the lifecycle
//! model and its distribution.

use async_graphql::{
    ComplexObject, Context, Enum, InputObject, Json, Object, Result, SimpleObject, ID,
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::accounts::{Env, ServiceResultExt};
use super::customers::{Profile, ProfileConnection};
use crate::service::{lifecycle, segments};

/// Whether a segment's stored membership is complete.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
pub enum SegmentStatus {
    /// Members are being computed; real-time changes resume when the build ends.
    Building,
    /// Membership is exact and kept up to date in real time.
    Ready,
}

/// condition: the JSON condition language of shared contract segment-conditions.md
#[derive(SimpleObject, Clone, Debug)]
#[graphql(complex)]
pub struct Segment {
    pub id: ID,
    pub name: String,
    pub description: Option<String>,
    pub condition: Json<Value>,
    pub status: SegmentStatus,
    /// The condition has a time window or relative time: the scheduler re-evaluates it.
    pub time_dependent: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[graphql(skip)]
    uuid: Uuid,
}

impl From<segments::Segment> for Segment {
    fn from(segment: segments::Segment) -> Self {
        Segment {
            id: ID(segment.id.to_string()),
            uuid: segment.id,
            name: segment.name,
            description: segment.description,
            condition: Json(segment.condition),
            status: if segment.building {
                SegmentStatus::Building
            } else {
                SegmentStatus::Ready
            },
            time_dependent: segment.time_dependent,
            created_at: segment.created_at,
            updated_at: segment.updated_at,
        }
    }
}

#[ComplexObject]
impl Segment {
    /// The number of members now.
    async fn size(&self, ctx: &Context<'_>) -> Result<i32> {
        let env = Env::of(ctx)?;
        let size = segments::size(env.state, env.principal()?, self.uuid)
            .await
            .gql()?;
        Ok(i32::try_from(size).unwrap_or(i32::MAX))
    }

    /// Members in profile id order.
    async fn members(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: Option<i32>,
        after: Option<String>,
    ) -> Result<ProfileConnection> {
        let env = Env::of(ctx)?;
        segments::members(
            env.state,
            env.principal()?,
            self.uuid,
            first,
            after.as_deref(),
        )
        .await
        .gql()
        .map(ProfileConnection::from)
    }
}

#[derive(InputObject, Debug)]
pub struct SegmentInput {
    pub name: String,
    pub description: Option<String>,
    pub condition: Json<Value>,
}

impl From<SegmentInput> for segments::SegmentInput {
    fn from(input: SegmentInput) -> Self {
        segments::SegmentInput {
            name: input.name,
            description: input.description,
            condition: input.condition.0,
        }
    }
}

#[derive(SimpleObject, Clone, Debug)]
pub struct SegmentPreview {
    pub size: i32,
    /// Up to 10 matching profiles, in id order.
    pub sample: Vec<Profile>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct SegmentMembershipChange {
    pub segment_id: ID,
    pub profile_id: ID,
    pub entered: bool,
    pub at: DateTime<Utc>,
    /// What caused it: the message's events and traits, "time passed", "merged into …".
    pub reason: String,
}

#[derive(InputObject, Debug)]
pub struct LifecycleStageInput {
    pub key: String,
    pub name: String,
    pub condition: Json<Value>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct LifecycleStage {
    pub key: String,
    pub name: String,
    pub condition: Json<Value>,
    pub position: i32,
}

impl From<lifecycle::Stage> for LifecycleStage {
    fn from(stage: lifecycle::Stage) -> Self {
        LifecycleStage {
            key: stage.key,
            name: stage.name,
            condition: Json(stage.condition),
            position: i32::try_from(stage.position).unwrap_or(i32::MAX),
        }
    }
}

/// Profiles per stage; `stage` is empty for profiles that match no stage of a custom model.
#[derive(SimpleObject, Clone, Debug)]
pub struct StageCount {
    pub stage: String,
    pub count: i32,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct LifecycleTransition {
    pub profile_id: ID,
    pub from: Option<String>,
    pub to: String,
    pub at: DateTime<Utc>,
    /// What caused it: the message's events and traits, "time passed", "lifecycle model changed".
    pub reason: String,
}

impl From<lifecycle::Transition> for LifecycleTransition {
    fn from(transition: lifecycle::Transition) -> Self {
        LifecycleTransition {
            profile_id: ID(transition.profile_id.to_string()),
            from: transition.from,
            to: transition.to,
            at: transition.at,
            reason: transition.reason,
        }
    }
}

fn count(value: u64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

#[derive(Default)]
pub struct SegmentsQuery;

#[Object]
impl SegmentsQuery {
    async fn segments(&self, ctx: &Context<'_>) -> Result<Vec<Segment>> {
        let env = Env::of(ctx)?;
        Ok(segments::list(env.state, env.principal()?)
            .await
            .gql()?
            .into_iter()
            .map(Segment::from)
            .collect())
    }

    async fn segment(&self, ctx: &Context<'_>, id: ID) -> Result<Option<Segment>> {
        let env = Env::of(ctx)?;
        Ok(segments::get(env.state, env.principal()?, &id)
            .await
            .gql()?
            .map(Segment::from))
    }

    /// Size and sample of a condition, without saving anything.
    async fn preview_segment(
        &self,
        ctx: &Context<'_>,
        condition: Json<Value>,
    ) -> Result<SegmentPreview> {
        let env = Env::of(ctx)?;
        let preview = segments::preview(env.state, env.principal()?, &condition.0)
            .await
            .gql()?;
        Ok(SegmentPreview {
            size: count(preview.size),
            sample: preview.sample.into_iter().map(Profile::from).collect(),
        })
    }

    /// Ordered list; a profile's stage is the first stage whose condition matches.
    async fn lifecycle_model(&self, ctx: &Context<'_>) -> Result<Vec<LifecycleStage>> {
        let env = Env::of(ctx)?;
        Ok(lifecycle::model(env.state, env.principal()?)
            .await
            .gql()?
            .into_iter()
            .map(LifecycleStage::from)
            .collect())
    }

    async fn lifecycle_distribution(&self, ctx: &Context<'_>) -> Result<Vec<StageCount>> {
        let env = Env::of(ctx)?;
        Ok(lifecycle::distribution(env.state, env.principal()?)
            .await
            .gql()?
            .into_iter()
            .map(|(stage, value)| StageCount {
                stage,
                count: count(value),
            })
            .collect())
    }
}

#[derive(Default)]
pub struct SegmentsMutation;

#[Object]
impl SegmentsMutation {
    /// Saves the segment and computes its members; answers once they are computed (or, for a
    /// very large segment, with status BUILDING while the build goes on).
    async fn create_segment(&self, ctx: &Context<'_>, input: SegmentInput) -> Result<Segment> {
        let env = Env::of(ctx)?;
        segments::create(env.state, env.principal()?, env.meta(), input.into())
            .await
            .gql()
            .map(Segment::from)
    }

    async fn update_segment(
        &self,
        ctx: &Context<'_>,
        id: ID,
        input: SegmentInput,
    ) -> Result<Segment> {
        let env = Env::of(ctx)?;
        segments::update(env.state, env.principal()?, env.meta(), &id, input.into())
            .await
            .gql()
            .map(Segment::from)
    }

    async fn delete_segment(&self, ctx: &Context<'_>, id: ID) -> Result<bool> {
        let env = Env::of(ctx)?;
        segments::delete(env.state, env.principal()?, env.meta(), &id)
            .await
            .gql()
    }

    /// Replaces the lifecycle model and recomputes every profile's stage before answering.
    async fn set_lifecycle_model(
        &self,
        ctx: &Context<'_>,
        stages: Vec<LifecycleStageInput>,
    ) -> Result<Vec<LifecycleStage>> {
        let env = Env::of(ctx)?;
        let inputs = stages
            .into_iter()
            .map(|stage| domain::lifecycle::StageInput {
                key: stage.key,
                name: stage.name,
                condition: stage.condition.0,
            })
            .collect();
        Ok(
            lifecycle::set_model(env.state, env.principal()?, env.meta(), inputs)
                .await
                .gql()?
                .into_iter()
                .map(LifecycleStage::from)
                .collect(),
        )
    }
}

/// Profile fields of this section.
pub(super) async fn profile_transitions(
    ctx: &Context<'_>,
    profile_id: Uuid,
    first: Option<i32>,
) -> Result<Vec<LifecycleTransition>> {
    let env = Env::of(ctx)?;
    let limit = crate::service::pagination::page_size(first).gql()?;
    Ok(
        lifecycle::transitions(env.state, env.principal()?, profile_id, limit)
            .await
            .gql()?
            .into_iter()
            .map(<LifecycleTransition as From<lifecycle::Transition>>::from)
            .collect(),
    )
}

pub(super) async fn profile_segment_history(
    ctx: &Context<'_>,
    profile_id: Uuid,
    first: Option<i32>,
) -> Result<Vec<SegmentMembershipChange>> {
    let env = Env::of(ctx)?;
    let limit = crate::service::pagination::page_size(first).gql()?;
    Ok(
        segments::history_of_profile(env.state, env.principal()?, profile_id, limit)
            .await
            .gql()?
            .into_iter()
            .map(|change| SegmentMembershipChange {
                segment_id: ID(change.segment_id.to_string()),
                profile_id: ID(change.profile_id.to_string()),
                entered: change.entered,
                at: change.at,
                reason: change.reason,
            })
            .collect(),
    )
}
