//! Liveness and readiness.

use poem::http::StatusCode;
use poem::web::Data;
use poem::{handler, IntoResponse};

use crate::service::AppState;

/// 200 whenever the process is up.
#[handler]
pub fn healthz() -> &'static str {
    "ok"
}

/// 200 when the database answers, else 503; 503 too while the process shuts down, so that load
/// balancers stop sending it requests.
#[handler]
pub async fn readyz(Data(state): Data<&AppState>) -> poem::Response {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if state.store.ping().await {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response()
    }
}
