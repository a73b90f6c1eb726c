//! The gauges of `/metrics` that are read when scraped rather than counted as things happen.

use super::AppState;
use crate::store;

/// Sets the subscription gauges from this process's counts and the outbox gauges from the
/// database (one small query; a failure leaves the previous values and is logged).
pub async fn refresh_gauges(state: &AppState) {
    let metrics = &state.metrics;
    let (sockets, subscriptions) = state.realtime.totals();
    metrics.websockets.set(sockets as i64);
    metrics.subscriptions.set(subscriptions as i64);
    let backlog = async {
        let tx = state.store.read_system("metrics: outbox backlog").await?;
        let backlog = store::outbox::backlog(&tx).await?;
        tx.commit().await?;
        Ok::<_, store::StoreError>(backlog)
    };
    match backlog.await {
        Ok((depth, oldest)) => {
            metrics.outbox_depth.set(depth);
            let age = oldest
                .map(|oldest| (state.now() - oldest).num_milliseconds().max(0) as f64 / 1000.0)
                .unwrap_or(0.0);
            metrics.outbox_oldest_age.set(age);
        }
        Err(error) => tracing::warn!(error = %error, "metrics: cannot read the outbox backlog"),
    }
}
