//! The `campaigns` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "campaigns")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: Uuid,
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub name: String,
    /// DRAFT, ACTIVE or PAUSED.
    pub status: String,
    /// segmentEntered, stageEntered, event or broadcastSegment.
    pub trigger_kind: String,
    pub segment_id: Option<Uuid>,
    pub stage: Option<String>,
    pub event: Option<String>,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
    pub consent_purpose: String,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
