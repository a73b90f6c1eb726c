//! The GraphiQL page, with every asset embedded in the binary so that it works offline.
//! The assets are vendored by `scripts/vendor-graphiql.sh`.

use poem::http::{header, StatusCode};
use poem::web::Path;
use poem::{handler, IntoResponse, Response};

const INDEX: &str = include_str!("../../assets/graphiql/index.html");

/// The GraphiQL page (`GET /graphql` without a query).
pub fn page_response() -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(INDEX)
}

#[handler]
pub fn asset(Path(file): Path<String>) -> Response {
    let (content_type, bytes): (&str, &'static [u8]) = match file.as_str() {
        "graphiql.min.js" => (
            "text/javascript",
            include_bytes!("../../assets/graphiql/graphiql.min.js"),
        ),
        "graphiql.min.css" => (
            "text/css",
            include_bytes!("../../assets/graphiql/graphiql.min.css"),
        ),
        "react.production.min.js" => (
            "text/javascript",
            include_bytes!("../../assets/graphiql/react.production.min.js"),
        ),
        "react-dom.production.min.js" => (
            "text/javascript",
            include_bytes!("../../assets/graphiql/react-dom.production.min.js"),
        ),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "public, max-age=86400")
        .body(bytes)
}
