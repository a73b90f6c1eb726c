//! `GET /activate` and `GET /reset-password`: the pages the links of the activation and
//! password-reset emails open (`{CDP_PUBLIC_URL}/activate?token=…`). One static page, no asset
//! from elsewhere; it asks for the password and calls `activateAccount` or `resetPassword` on
//! `/graphql` with the token of its URL. A frontend that has its own pages points
//! `CDP_PUBLIC_URL` at itself instead.

use poem::http::header;
use poem::{handler, Response};

const PAGE: &str = include_str!("../../assets/account/page.html");

#[handler]
pub fn page() -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        // The token is in the URL: never sent on as a referrer, never framed.
        .header("referrer-policy", "no-referrer")
        .header("x-frame-options", "DENY")
        .header(
            "content-security-policy",
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; frame-ancestors 'none'",
        )
        .body(PAGE)
}
