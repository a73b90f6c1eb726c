//! Writing and reading the audit log.

use domain::Permission;
use serde_json::Value;

use super::auth::require_permission;
use super::pagination::{build_page, decode_cursor, page_size, Page};
use super::{AppState, RequestMeta, ServiceResult};
use crate::auth::Principal;
use crate::store::{self, TenantTx};

/// One audit entry as the service returns it.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub id: uuid::Uuid,
    pub at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub detail: Option<Value>,
    pub ip: Option<String>,
}

/// Records a change in the same transaction as the change itself.
pub async fn record(
    state: &AppState,
    tx: &TenantTx,
    meta: &RequestMeta,
    actor: &str,
    action: &str,
    target: Option<&str>,
    detail: Option<Value>,
) -> ServiceResult<()> {
    store::audit::append(
        tx,
        store::audit::NewAuditEntry {
            actor,
            action,
            target,
            detail,
            ip: meta.ip.as_deref(),
        },
        state.now(),
    )
    .await?;
    Ok(())
}

pub async fn list(
    state: &AppState,
    principal: Option<&Principal>,
    first: Option<i32>,
    after: Option<&str>,
) -> ServiceResult<Page<AuditEntry>> {
    let principal = require_permission(principal, Permission::AuditRead)?;
    let limit = page_size(first)?;
    let before = decode_cursor(after)?;
    let tx = state.store.read(principal.tenant_id).await?;
    let (rows, total) = store::audit::page(&tx, before, limit + 1).await?;
    Ok(build_page(
        rows,
        limit,
        total,
        |row| row.id,
        |row| AuditEntry {
            id: row.id,
            at: row.at,
            actor: row.actor,
            action: row.action,
            target: row.target,
            detail: row.detail,
            ip: row.ip,
        },
    ))
}
