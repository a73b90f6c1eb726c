//! One-click unsubscribe (RFC 8058): `GET /unsubscribe?token=…` shows a small confirmation page
//! with a form, and `POST /unsubscribe?token=…` with the body `List-Unsubscribe=One-Click` (what
//! mail clients send, and what the form sends) withdraws the consent the token names.
//!
//! Guarantees: the token is checked before anything else (a bad one is 400 with
//! `{"code","message"}`); the POST is idempotent and answers 200 once the withdrawal is
//! committed; a GET never changes anything (link scanners follow GET links).

use poem::http::{header, StatusCode};
use poem::web::{Data, Query};
use poem::{handler, Request, Response};
use serde::Deserialize;
use serde_json::json;

use super::graphql::request_meta;
use crate::service::{campaigns, AppState, ServiceError};

#[derive(Debug, Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

fn failure(status: StatusCode, code: &str, message: &str) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(json!({"code": code, "message": message}).to_string())
}

fn page(body: &str) -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .body(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Unsubscribe</title>\
             <meta name=\"viewport\" content=\"width=device-width\"></head>\
             <body style=\"font-family:sans-serif;max-width:32em;margin:4em auto\">{body}</body></html>"
        ))
}

fn bad_token() -> Response {
    failure(
        StatusCode::BAD_REQUEST,
        "BAD_USER_INPUT",
        "this unsubscribe link is not valid",
    )
}

/// The confirmation page.
#[handler]
pub async fn show(Data(state): Data<&AppState>, Query(query): Query<TokenQuery>) -> Response {
    let Some(token) = query.token else {
        return bad_token();
    };
    if campaigns::parse_unsubscribe_token(state, &token)
        .await
        .is_err()
    {
        return bad_token();
    }
    // The token is URL-safe base64: it needs no escaping in the attribute.
    page(&format!(
        "<h1>Unsubscribe</h1><p>Stop receiving these emails?</p>\
         <form method=\"post\" action=\"/unsubscribe?token={token}\">\
         <input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
         <button type=\"submit\">Unsubscribe</button></form>"
    ))
}

/// The one-click withdrawal.
#[handler]
pub async fn confirm(
    request: &Request,
    Data(state): Data<&AppState>,
    Query(query): Query<TokenQuery>,
    body: String,
) -> Response {
    let Some(token) = query.token else {
        return bad_token();
    };
    if campaigns::parse_unsubscribe_token(state, &token)
        .await
        .is_err()
    {
        return bad_token();
    }
    let one_click = body
        .split('&')
        .any(|pair| pair.trim() == "List-Unsubscribe=One-Click");
    if !one_click {
        return failure(
            StatusCode::BAD_REQUEST,
            "BAD_USER_INPUT",
            "the body must be List-Unsubscribe=One-Click",
        );
    }
    let meta = request_meta(request, state);
    match campaigns::unsubscribe(state, &meta, &token).await {
        Ok(()) => page("<h1>Unsubscribed</h1><p>You will not receive these emails any more.</p>"),
        Err(ServiceError::BadInput { .. }) => bad_token(),
        Err(error) => {
            let reference = uuid::Uuid::new_v4();
            tracing::error!(%reference, error = ?error, "unsubscribe failed");
            failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                &format!("internal error (reference {reference})"),
            )
        }
    }
}
