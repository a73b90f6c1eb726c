//! The account emails (activation, password reset), queued in the outbox in the caller's
//! transaction.

use domain::Email;
use uuid::Uuid;

use super::{AppState, ServiceResult};
use crate::store::{self, TenantTx};

/// A stable Message-ID for an outbox row, so that a resend after a crash is recognisable as the
/// same message by the receiving server.
pub fn message_id(state: &AppState, id: Uuid) -> String {
    let host = state
        .config
        .public_url
        .split("://")
        .nth(1)
        .unwrap_or("localhost")
        .split(['/', ':'])
        .next()
        .filter(|host| !host.is_empty())
        .unwrap_or("localhost");
    format!("<{id}@{host}>")
}

async fn queue(
    state: &AppState,
    tx: &TenantTx,
    kind: &str,
    to: &Email,
    subject: &str,
    text_body: &str,
) -> ServiceResult<()> {
    let id = Uuid::now_v7();
    let message_id = message_id(state, id);
    store::outbox::enqueue(
        tx,
        store::outbox::NewEmail {
            id,
            message_id: &message_id,
            kind,
            to_address: to.as_str(),
            subject,
            text_body,
            html_body: None,
            headers: serde_json::json!({}),
            max_attempts: state.config.outbox_max_attempts,
        },
        state.now(),
    )
    .await?;
    Ok(())
}

pub async fn queue_activation(
    state: &AppState,
    tx: &TenantTx,
    to: &Email,
    tenant_name: &str,
    token: &str,
) -> ServiceResult<()> {
    let link = format!("{}/activate?token={token}", state.config.public_url);
    let hours = state.config.activation_token_ttl.as_secs() / 3600;
    let body = format!(
        "Hello,\n\nan account was created for you on the customer data platform of {tenant_name}.\n\
         Open this link to choose your password and activate it:\n\n{link}\n\n\
         The link works once and expires in {hours} hours.\n\
         If you did not expect this email, ignore it.\n"
    );
    queue(
        state,
        tx,
        "activation",
        to,
        &format!("Activate your {tenant_name} account"),
        &body,
    )
    .await
}

pub async fn queue_password_reset(
    state: &AppState,
    tx: &TenantTx,
    to: &Email,
    tenant_name: &str,
    token: &str,
) -> ServiceResult<()> {
    let link = format!("{}/reset-password?token={token}", state.config.public_url);
    let minutes = state.config.reset_token_ttl.as_secs() / 60;
    let body = format!(
        "Hello,\n\nsomeone asked to reset the password of your {tenant_name} account.\n\
         Open this link to choose a new password:\n\n{link}\n\n\
         The link works once and expires in {minutes} minutes. Resetting signs you out everywhere.\n\
         If you did not ask for this, ignore this email; your password stays as it is.\n"
    );
    queue(
        state,
        tx,
        "password_reset",
        to,
        &format!("Reset your {tenant_name} password"),
        &body,
    )
    .await
}
