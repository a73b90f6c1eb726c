//! The `profiles` table as understanding sees it: what conditions read (traits, seen times, event
//! count) and the columns it writes (stage and computed attributes). Ingestion's profile upserts
//! never name the written ones, so they cannot overwrite them; this entity is never inserted.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "profiles")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: Uuid,
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub merged_into: Option<Uuid>,
    pub traits: Json,
    pub first_seen_at: DateTimeUtc,
    pub last_seen_at: DateTimeUtc,
    pub event_count: i64,
    pub stage: Option<String>,
    pub stage_since: Option<DateTimeUtc>,
    pub total_revenue: f64,
    pub order_count: i64,
    pub mean_gap_seconds: Option<f64>,
    pub rfm_recency: Option<i32>,
    pub rfm_frequency: Option<i32>,
    pub rfm_monetary: Option<i32>,
    pub churn_risk: bool,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
