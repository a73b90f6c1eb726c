//! The customer-analytics section: stage funnel, segment overlap, segment size history and the
//! RFM grid. Additions to the contract; every field needs PROFILES_READ.

use async_graphql::{Context, Object, Result, SimpleObject, ID};
use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use super::accounts::{Env, ServiceResultExt};
use crate::service::analytics;

fn count(n: i64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// One step of the lifecycle funnel: from a stage to the next one in the model.
#[derive(SimpleObject, Clone, Debug)]
pub struct StageFunnelStep {
    /// Key of the earlier stage.
    pub from_stage: String,
    pub from_name: String,
    /// Key of the next stage in the model.
    pub to_stage: String,
    pub to_name: String,
    /// Live profiles in fromStage at some time in the period: in it when the period began, or
    /// entering it during the period.
    pub reached: i32,
    /// Live profiles with a transition fromStage → toStage during the period.
    pub converted: i32,
    /// converted / reached; 0 when reached is 0.
    pub conversion_rate: f64,
}

impl From<analytics::FunnelStep> for StageFunnelStep {
    fn from(step: analytics::FunnelStep) -> Self {
        StageFunnelStep {
            from_stage: step.from_stage,
            from_name: step.from_name,
            to_stage: step.to_stage,
            to_name: step.to_name,
            reached: count(step.reached),
            converted: count(step.converted),
            conversion_rate: step.conversion_rate,
        }
    }
}

/// How two segments' current members overlap.
#[derive(SimpleObject, Clone, Debug)]
pub struct SegmentOverlap {
    pub size_a: i32,
    pub size_b: i32,
    /// Members of both.
    pub intersection: i32,
    /// Members of either.
    pub union: i32,
    /// intersection / union; 0 when both are empty.
    pub jaccard: f64,
}

/// The size of a segment on one day (UTC).
#[derive(SimpleObject, Clone, Debug)]
pub struct SegmentSizePoint {
    /// YYYY-MM-DD.
    pub day: String,
    pub size: i32,
}

/// One cell of the RFM grid: profiles with this recency and frequency score.
#[derive(SimpleObject, Clone, Debug)]
pub struct RfmCell {
    /// 1 to 5; 5 bought most recently.
    pub recency: i32,
    /// 1 to 5; 5 bought most often.
    pub frequency: i32,
    pub profiles: i32,
    /// The summed totalRevenue of those profiles.
    pub total_revenue: f64,
}

#[derive(Default)]
pub struct AnalyticsQuery;

#[Object]
impl AnalyticsQuery {
    /// For each consecutive pair of lifecycle stages (model order): profiles that were in the
    /// first stage during [since, until) and how many moved on to the next.
    async fn stage_funnel(
        &self,
        ctx: &Context<'_>,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<StageFunnelStep>> {
        let env = Env::of(ctx)?;
        Ok(
            analytics::stage_funnel(env.state, env.principal()?, since, until)
                .await
                .gql()?
                .into_iter()
                .map(StageFunnelStep::from)
                .collect(),
        )
    }

    /// Sizes of segments a and b, of their intersection and union, and the Jaccard index.
    async fn segment_overlap(&self, ctx: &Context<'_>, a: ID, b: ID) -> Result<SegmentOverlap> {
        let env = Env::of(ctx)?;
        let overlap = analytics::segment_overlap(env.state, env.principal()?, &a, &b)
            .await
            .gql()?;
        Ok(SegmentOverlap {
            size_a: count(overlap.size_a),
            size_b: count(overlap.size_b),
            intersection: count(overlap.intersection),
            union: count(overlap.union),
            jaccard: overlap.jaccard,
        })
    }

    /// The daily sizes of a segment over the last `days` days (1 to 366, today included),
    /// oldest first; days without a snapshot are left out.
    async fn segment_size_history(
        &self,
        ctx: &Context<'_>,
        segment_id: ID,
        #[graphql(default = 30)] days: Option<i32>,
    ) -> Result<Vec<SegmentSizePoint>> {
        let env = Env::of(ctx)?;
        Ok(analytics::segment_size_history(
            env.state,
            env.principal()?,
            &segment_id,
            days.unwrap_or(30),
        )
        .await
        .gql()?
        .into_iter()
        .map(|(day, size): (NaiveDate, i64)| SegmentSizePoint {
            day: day.format("%Y-%m-%d").to_string(),
            size: count(size),
        })
        .collect())
    }

    /// All 25 (recency, frequency) score pairs, recency 5 to 1 then frequency 5 to 1, with the
    /// number of profiles in each (zero included). Profiles without orders are not scored.
    async fn rfm_distribution(&self, ctx: &Context<'_>) -> Result<Vec<RfmCell>> {
        let env = Env::of(ctx)?;
        Ok(analytics::rfm_distribution(env.state, env.principal()?)
            .await
            .gql()?
            .into_iter()
            .map(|cell| RfmCell {
                recency: cell.recency,
                frequency: cell.frequency,
                profiles: count(cell.profiles),
                total_revenue: cell.total_revenue,
            })
            .collect())
    }
}

/// RFM quintile scores, 1 to 5 each (5: most recent, most frequent, highest spending).
#[derive(SimpleObject, Clone, Debug)]
pub struct Rfm {
    pub recency: i32,
    pub frequency: i32,
    pub monetary: i32,
    /// recency × 100 + frequency × 10 + monetary (the `rfm_score` of conditions).
    pub score: i32,
}

/// Computed customer attributes (docs/understand.md, "Customer analytics").
#[derive(SimpleObject, Clone, Debug)]
pub struct CustomerAttributes {
    pub total_revenue: f64,
    pub order_count: i32,
    /// Mean time between the profile's events, in seconds (with at least two events).
    pub mean_gap_seconds: Option<f64>,
    /// None until the profile has an order and the scheduler has scored it.
    pub rfm: Option<Rfm>,
    pub churn_risk: bool,
    pub days_since_last_seen: i32,
}

pub(super) async fn profile_attributes(
    ctx: &Context<'_>,
    profile_id: Uuid,
) -> Result<Option<CustomerAttributes>> {
    Ok(
        super::loaders::load(ctx, super::loaders::AttributesOf(profile_id))
            .await?
            .map(|attributes| CustomerAttributes {
                total_revenue: attributes.total_revenue,
                order_count: i32::try_from(attributes.order_count).unwrap_or(i32::MAX),
                mean_gap_seconds: attributes.mean_gap_seconds,
                rfm: attributes.rfm.map(|rfm| Rfm {
                    recency: rfm.recency,
                    frequency: rfm.frequency,
                    monetary: rfm.monetary,
                    score: rfm.score(),
                }),
                churn_risk: attributes.churn_risk,
                days_since_last_seen: i32::try_from(attributes.days_since_last_seen)
                    .unwrap_or(i32::MAX),
            }),
    )
}
