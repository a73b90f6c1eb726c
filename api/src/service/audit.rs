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
    // Actors and details name people (a signed-up owner's email, an invited user): masked for a
    // principal without PII_READ, like everything else.
    let masked = super::profiles::masks(principal);
    let pii = if masked {
        super::privacy::settings_in(&tx).await?.pii_keys()
    } else {
        domain::pii::PiiKeys::default()
    };
    let shown = |text: String| {
        if masked {
            domain::pii::mask_free_text(&text)
        } else {
            text
        }
    };
    Ok(build_page(
        rows,
        limit,
        Some(total),
        |row| row.id,
        |row| AuditEntry {
            id: row.id,
            at: row.at,
            actor: shown(row.actor),
            action: row.action,
            target: row.target.map(shown),
            detail: match row.detail {
                Some(detail) if masked => Some(domain::pii::mask_json(&detail, &pii)),
                other => other,
            },
            ip: if masked {
                row.ip.map(|_| "***".to_owned())
            } else {
                row.ip
            },
        },
    ))
}
