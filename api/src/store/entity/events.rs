//! The `events` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: Uuid,
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub profile_id: Uuid,
    pub message_id: String,
    #[sea_orm(column_name = "type")]
    pub kind: String,
    pub name: Option<String>,
    pub properties: Json,
    pub context: Json,
    pub timestamp: DateTimeUtc,
    pub received_at: DateTimeUtc,
    pub source_id: Option<Uuid>,
    pub channel: String,
    pub user_id: Option<String>,
    pub anonymous_id: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
