//! Builds the application (store, state, schema, routes, background jobs), binds the port and
//! serves. `main` and the tests both use [`build`], so tests run exactly what production runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use poem::listener::{Acceptor, Listener, TcpListener};
use poem::{Endpoint, Server};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::jwt::JwtKeys;
use crate::auth::password::Hasher;
use crate::auth::throttle::LoginThrottle;
use crate::config::Config;
use crate::mail::Mailer;
use crate::service::{AppState, Clock, SystemClock};
use crate::store::{Store, StoreOptions};
use crate::{graphql, http, jobs};

/// Opens the store, applies pending migrations and assembles the shared state.
pub async fn state(config: Config, clock: Arc<dyn Clock>) -> anyhow::Result<AppState> {
    let store = Store::connect(&StoreOptions {
        url: config.database_url.clone(),
        max_connections: config.database_max_connections,
        min_connections: config.database_min_connections,
    })
    .await
    .context("cannot connect to the database (CDP_DATABASE_URL)")?;
    store
        .migrate()
        .await
        .context("cannot migrate the database")?;
    let hashing_slots = match config.abuse.password_hash_concurrency {
        0 => std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(2),
        slots => slots,
    };
    Ok(AppState {
        store,
        jwt: JwtKeys::new(&config.jwt_secret),
        hasher: Hasher::new(hashing_slots, config.abuse.password_hash_queue)?,
        login_throttle: Arc::new(LoginThrottle::new(
            config.login_max_failures,
            config.login_throttle_window,
        )),
        standings: Arc::default(),
        realtime: crate::service::realtime::Realtime::new(crate::service::realtime::Limits {
            sockets_per_tenant: config.ws_max_sockets_per_tenant,
            subscriptions_per_tenant: config.ws_max_subscriptions_per_tenant,
        }),
        vault: Arc::new(crate::service::vault::Vault::new(
            config.encryption_key,
            &config.encryption_keys_previous,
        )),
        request_limits: Arc::new(crate::service::limits::RequestLimits::new(&config.abuse)),
        metrics: Arc::new(crate::metrics::Metrics::new()),
        draining: Arc::default(),
        stopping: Arc::new(watch::channel(false).0),
        config: Arc::new(config),
        clock,
        bus: crate::service::bus::Bus::new(),
        group_commit: Default::default(),
    })
}

/// A running server and its background jobs.
pub struct Application {
    address: SocketAddr,
    /// Whether the listener serves HTTPS.
    tls: bool,
    state: AppState,
    schema: graphql::CdpSchema,
    server: JoinHandle<std::io::Result<()>>,
    jobs: Vec<JoinHandle<()>>,
}

/// Builds everything and starts serving on the configured address (port 0 picks a free port).
pub async fn build(config: Config) -> anyhow::Result<Application> {
    build_with_clock(config, Arc::new(SystemClock)).await
}

pub async fn build_with_clock(
    config: Config,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Application> {
    let listen = config.listen;
    let state = state(config, clock).await?;
    let mailer = Mailer::from_config(
        state.config.smtp_url.as_deref(),
        state.config.smtp_ca_cert.as_deref(),
        state.config.mailbox_dir(),
    )
    .context("cannot set up email (CDP_SMTP_URL)")?;
    tracing::info!(mail = %mailer.describe(), "email goes to {}", mailer.describe());

    let shutdown_rx = state.stopping.subscribe();
    let mut background = Vec::new();
    for _ in 0..state.config.outbox_workers {
        background.push(tokio::spawn(jobs::outbox::run(
            state.clone(),
            mailer.clone(),
            shutdown_rx.clone(),
        )));
    }

    for _ in 0..state.config.webhook_workers {
        background.push(tokio::spawn(jobs::webhooks::run(
            state.clone(),
            shutdown_rx.clone(),
        )));
    }

    background.push(tokio::spawn(jobs::scheduler::run(
        state.clone(),
        shutdown_rx.clone(),
    )));
    // Other replicas' committed changes, for this process's subscribers (PostgreSQL only).
    background.push(tokio::spawn(crate::service::fanout::run(
        state.clone(),
        shutdown_rx.clone(),
    )));

    let schema = graphql::build_schema(state.clone(), &state.config.graphql, &state.config.abuse);
    let app = http::app(state.clone(), schema.clone());
    let acceptor = TcpListener::bind(listen)
        .into_acceptor()
        .await
        .with_context(|| format!("cannot listen on {listen} (CDP_LISTEN)"))?;
    let address = acceptor
        .local_addr()
        .first()
        .and_then(|address| address.as_socket_addr().copied())
        .context("the listener has no address")?;
    let server = match &state.config.tls {
        Some(files) => {
            // Read again at start (a replaced certificate is picked up by a restart).
            let tls = http::tls::server_config(files)?;
            serve(
                http::tls::TlsAcceptor::new(acceptor, tls),
                app,
                shutdown_rx.clone(),
                state.config.shutdown_timeout,
            )
        }
        None => serve(
            acceptor,
            app,
            shutdown_rx.clone(),
            state.config.shutdown_timeout,
        ),
    };
    let tls = state.config.tls.is_some();
    tracing::info!(%address, tls, "serving");
    Ok(Application {
        address,
        tls,
        state,
        schema,
        server,
        jobs: background,
    })
}

/// Serves `app` on `acceptor` until `shutdown` turns true, then lets in-flight requests finish.
fn serve<A>(
    acceptor: A,
    app: impl Endpoint + 'static,
    mut shutdown: watch::Receiver<bool>,
    timeout: Duration,
) -> JoinHandle<std::io::Result<()>>
where
    A: Acceptor + 'static,
{
    tokio::spawn(async move {
        Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(
                app,
                async move {
                    let _ = shutdown.wait_for(|stop| *stop).await;
                },
                Some(timeout),
            )
            .await
    })
}

impl Application {
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `https` when the listener serves TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// The schema it serves, with the transport's caches in its data.
    pub fn schema(&self) -> &graphql::CdpSchema {
        &self.schema
    }

    /// Drains, then stops: readiness answers 503 at once; after `CDP_DRAIN_DELAY_SECS` the
    /// listener stops accepting, WebSockets are closed (1001), in-flight requests and the email
    /// being sent finish; whatever still runs after `CDP_SHUTDOWN_TIMEOUT_SECS` is abandoned
    /// (an email in flight is sent again after its lease: the outbox is at least once).
    pub async fn stop(self) -> anyhow::Result<()> {
        let config = self.state.config.clone();
        self.state
            .draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.state.metrics.draining.set(1);
        if !config.drain_delay.is_zero() {
            tracing::info!(delay = ?config.drain_delay, "draining: readiness answers 503");
            tokio::time::sleep(config.drain_delay).await;
        }
        self.state.stopping.send_replace(true);
        let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
        for job in self.jobs {
            match tokio::time::timeout_at(deadline, job).await {
                Ok(joined) => joined?,
                Err(_) => {
                    tracing::warn!(timeout = ?config.shutdown_timeout, "a background job did not finish in time; exiting anyway");
                    break;
                }
            }
        }
        // The server applies the same timeout to the connections it still holds.
        self.server.await??;
        tracing::info!("stopped");
        Ok(())
    }

    /// Serves until SIGINT or SIGTERM, then stops gracefully.
    pub async fn run_until_signal(self) -> anyhow::Result<()> {
        shutdown_signal().await;
        tracing::info!("shutting down");
        self.stop().await
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
