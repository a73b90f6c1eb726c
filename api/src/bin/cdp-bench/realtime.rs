//! The `realtime` scenario: how long a committed event takes to reach WebSocket subscribers.
//!
//! S subscribers (1,000 by default) each open their own socket to `/graphql/ws`
//! (`graphql-transport-ws`, authenticated in `connection_init`) and subscribe to
//! `eventIngested(name: "Bench Tick")`. Once the server reports every subscription live, one
//! client posts one `track` message per request to `POST /v1/batch` at a steady rate (R requests a
//! second, for D seconds), each carrying its sequence number. The server answers only after the
//! commit and the publication on the bus, so the answer's arrival is the latest moment of the
//! commit: latency is measured from it to each subscriber's message, and reported as p50, p99 and
//! max over every (event, subscriber) pair. A message that arrives before the answer counts as
//! zero. The latency from the request being sent (which adds the ingestion itself) is reported
//! next to it. Client and server share the machine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{self, BackendArgs, BenchDb, Loopback, Server};

const EVENT_NAME: &str = "Bench Tick";

/// `cdp-bench realtime`: commit-to-subscriber latency with many WebSocket subscribers.
#[derive(Debug, Clone, clap::Args)]
pub struct RealtimeArgs {
    /// Small sizes (100 subscribers for 5 s unless told otherwise).
    #[arg(long)]
    pub quick: bool,
    /// WebSocket subscribers, one socket each (default 1,000; 100 with --quick).
    #[arg(long, value_name = "S")]
    pub subscribers: Option<usize>,
    /// Ingest requests per second, one event each.
    #[arg(long, value_name = "R", default_value_t = 20)]
    pub rate: u32,
    /// How long to ingest, in seconds (default 15; 5 with --quick).
    #[arg(long, value_name = "D")]
    pub seconds: Option<u64>,
    #[command(flatten)]
    pub backends: BackendArgs,
}

/// The JSON line of one backend.
#[derive(Debug, Serialize)]
struct RealtimeResult {
    scenario: &'static str,
    backend: &'static str,
    figure: &'static str,
    value: f64,
    /// The same p99 through a plain WebSocket fan-out (see [`baseline`]).
    baseline: f64,
    /// `value / baseline`: lower is better here.
    ratio: f64,
    baseline_p50_ms: f64,
    baseline_missing: usize,
    subscribers: usize,
    events: usize,
    rate_per_s: u32,
    deliveries: usize,
    missing: usize,
    lag_errors: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    p50_from_sent_ms: f64,
    p99_from_sent_ms: f64,
    ingest_p50_ms: f64,
}

/// When each event was sent and answered.
#[derive(Default)]
struct Clocks {
    sent: HashMap<u64, Instant>,
    answered: HashMap<u64, Instant>,
}

pub async fn run(args: RealtimeArgs) -> anyhow::Result<()> {
    let subscribers = args
        .subscribers
        .unwrap_or(if args.quick { 100 } else { 1000 });
    let seconds = args.seconds.unwrap_or(if args.quick { 5 } else { 15 });
    let rate = args.rate.max(1);
    harness::on_each_backend(&args.backends, |db| {
        scenario(db, subscribers, rate, seconds)
    })
    .await
}

async fn start(db: &BenchDb, subscribers: usize) -> anyhow::Result<Server> {
    let mut config = api::config::Config::for_tests(&db.data_dir, &db.service_url);
    config.outbox_workers = 0;
    config.database_max_connections = 10;
    config.database_min_connections = 10;
    config.log_filter = "warn".to_owned();
    config.ws_max_sockets_per_tenant = subscribers.max(1000);
    config.ws_max_subscriptions_per_tenant = subscribers.max(5000);
    let app = api::startup::build(config)
        .await
        .context("the server does not start")?;
    let base = format!("http://{}", app.address());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    Ok(Server { app, base, client })
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a socket, authenticates and subscribes.
async fn subscriber(server: &Server, token: &str) -> anyhow::Result<Socket> {
    let mut request = server
        .url("/graphql/ws")
        .replace("http://", "ws://")
        .into_client_request()?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    socket
        .send(Message::text(
            json!({"type": "connection_init", "payload": {"authorization": format!("Bearer {token}")}})
                .to_string(),
        ))
        .await?;
    match socket.next().await {
        Some(Ok(Message::Text(text))) if text.contains("connection_ack") => {}
        other => bail!("expected connection_ack, got {other:?}"),
    }
    socket
        .send(Message::text(
            json!({"type": "subscribe", "id": "1", "payload": {
                "query": "subscription($name: String) { eventIngested(name: $name) { properties } }",
                "variables": {"name": EVENT_NAME}}})
            .to_string(),
        ))
        .await?;
    Ok(socket)
}

/// What one subscriber saw: (sequence number, arrival) per event, and lag errors.
#[derive(Default)]
struct Seen {
    arrivals: Vec<(u64, Instant)>,
    lag_errors: usize,
}

/// Reads a subscriber's messages until it has `events` of them or `deadline` passes.
async fn listen(mut socket: Socket, events: usize, deadline: tokio::time::Instant) -> Seen {
    let mut seen = Seen::default();
    while seen.arrivals.len() < events {
        let message = match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(message))) => message,
            _ => break,
        };
        let Message::Text(text) = message else {
            continue;
        };
        let now = Instant::now();
        let Ok(message) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if message["type"] != "next" {
            continue;
        }
        let payload = &message["payload"];
        if payload.get("errors").is_some() {
            seen.lag_errors += 1;
            continue;
        }
        if let Some(seq) = payload
            .pointer("/data/eventIngested/properties/seq")
            .and_then(Value::as_u64)
        {
            seen.arrivals.push((seq, now));
        }
    }
    let _ = socket.close(None).await;
    seen
}

/// Latencies in milliseconds, sorted.
struct Measured {
    /// From each answer's arrival to each subscriber's message.
    latencies: Vec<f64>,
    /// From each request's sending to each subscriber's message.
    from_sent: Vec<f64>,
    /// Of the requests themselves.
    ingest: Vec<f64>,
    lag_errors: usize,
}

/// Sends `events` requests at `rate` a second (request `seq` carries `seq`), each on its own
/// task, while every socket is read; then pairs each arrival with its request's clocks.
async fn drive<F>(
    sockets: Vec<Socket>,
    events: usize,
    rate: u32,
    seconds: u64,
    request: F,
) -> anyhow::Result<Measured>
where
    F: Fn(u64) -> reqwest::RequestBuilder,
{
    let subscribers = sockets.len();
    // Readers get until 30 s after the last event is due.
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(seconds) + Duration::from_secs(30);
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|socket| tokio::spawn(listen(socket, events, deadline)))
        .collect();

    eprintln!("sending {events} events at {rate}/s");
    let clocks = Arc::new(Mutex::new(Clocks::default()));
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut requests = Vec::with_capacity(events);
    for seq in 0..events as u64 {
        ticker.tick().await;
        let pending = request(seq);
        let clocks = clocks.clone();
        // Each request runs on its own, so that a slow answer does not delay the next send.
        requests.push(tokio::spawn(async move {
            let sent = Instant::now();
            let response = pending.send().await?;
            let status = response.status();
            response.bytes().await?;
            let answered = Instant::now();
            if !status.is_success() {
                bail!("the request answered {status}");
            }
            let mut clocks = clocks.lock().unwrap_or_else(|e| e.into_inner());
            clocks.sent.insert(seq, sent);
            clocks.answered.insert(seq, answered);
            Ok(())
        }));
    }
    for request in requests {
        request.await??;
    }

    let mut latencies = Vec::with_capacity(events * subscribers);
    let mut from_sent = Vec::with_capacity(events * subscribers);
    let mut lag_errors = 0;
    let clocks = std::mem::take(&mut *clocks.lock().unwrap_or_else(|e| e.into_inner()));
    for reader in readers {
        let seen = reader.await?;
        lag_errors += seen.lag_errors;
        for (seq, arrival) in seen.arrivals {
            if let (Some(sent), Some(answered)) = (clocks.sent.get(&seq), clocks.answered.get(&seq))
            {
                latencies.push(arrival.saturating_duration_since(*answered).as_secs_f64() * 1e3);
                from_sent.push(arrival.saturating_duration_since(*sent).as_secs_f64() * 1e3);
            }
        }
    }
    let mut ingest: Vec<f64> = clocks
        .sent
        .iter()
        .filter_map(|(seq, sent)| {
            clocks
                .answered
                .get(seq)
                .map(|answered| answered.duration_since(*sent).as_secs_f64() * 1e3)
        })
        .collect();
    for values in [&mut latencies, &mut from_sent, &mut ingest] {
        values.sort_by(f64::total_cmp);
    }
    Ok(Measured {
        latencies,
        from_sent,
        ingest,
        lag_errors,
    })
}

/// The baseline: the same subscribers and the same rate against a plain poem server in this
/// process, whose `POST /publish` puts the message (in the shape the GraphQL subscription
/// sends) on a `tokio::sync::broadcast` channel and answers, and whose `/ws` forwards that
/// channel to each socket. No database, no GraphQL, no authentication: the floor that fan-out
/// over WebSockets on this machine sets.
async fn baseline(
    subscribers: usize,
    events: usize,
    rate: u32,
    seconds: u64,
) -> anyhow::Result<Measured> {
    use poem::web::websocket::{Message as WsMessage, WebSocket};
    use poem::web::{Data, Json};
    use poem::{get, post, EndpointExt, IntoResponse, Route};

    #[poem::handler]
    fn fan_out(
        ws: WebSocket,
        Data(channel): Data<&tokio::sync::broadcast::Sender<String>>,
    ) -> impl IntoResponse {
        let mut receiver = channel.subscribe();
        ws.on_upgrade(move |socket| async move {
            let (mut sink, mut stream) = socket.split();
            loop {
                tokio::select! {
                    message = receiver.recv() => match message {
                        Ok(text) => {
                            if sink.send(WsMessage::Text(text)).await.is_err() {
                                return;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    },
                    incoming = stream.next() => {
                        if !matches!(incoming, Some(Ok(_))) {
                            return;
                        }
                    }
                }
            }
        })
    }

    #[poem::handler]
    fn publish(
        Json(body): Json<Value>,
        Data(channel): Data<&tokio::sync::broadcast::Sender<String>>,
    ) -> &'static str {
        let message = json!({"type": "next", "id": "1", "payload": {"data": {"eventIngested": {"properties": body}}}});
        let _ = channel.send(message.to_string());
        "ok"
    }

    let (channel, _) = tokio::sync::broadcast::channel::<String>(4096);
    let app = Route::new()
        .at("/ws", get(fan_out))
        .at("/publish", post(publish))
        .data(channel.clone());
    let server = Loopback::start(app).await?;
    let address = server.address;
    let mut sockets = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{address}/ws")).await?;
        sockets.push(socket);
    }
    let ready = tokio::time::Instant::now() + Duration::from_secs(60);
    while channel.receiver_count() < subscribers {
        if tokio::time::Instant::now() > ready {
            bail!("the baseline's subscribers did not all connect");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let url = format!("http://{address}/publish");
    let measured = drive(sockets, events, rate, seconds, move |seq| {
        client.post(&url).json(&json!({"seq": seq}))
    })
    .await;
    server.stop().await;
    measured
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    harness::round(sorted[index], 2)
}

async fn scenario(
    db: Arc<BenchDb>,
    subscribers: usize,
    rate: u32,
    seconds: u64,
) -> anyhow::Result<RealtimeResult> {
    let server = start(&db, subscribers).await?;
    let owner = server.sign_up("realtime").await?;
    let key = server.write_key(&owner).await?;
    let events = (u64::from(rate) * seconds) as usize;

    eprintln!("opening {subscribers} subscribers");
    let mut sockets = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        sockets.push(subscriber(&server, &owner.access_token).await?);
    }
    let tenant_id = domain::TenantId(owner.tenant_id);
    tokio::time::timeout(
        Duration::from_secs(60),
        server
            .app
            .state()
            .realtime
            .wait_for_subscriptions(tenant_id, subscribers),
    )
    .await
    .context("the subscriptions did not start")?;

    let client = server.client.clone();
    let url = server.url("/v1/batch");
    let measured = drive(sockets, events, rate, seconds, move |seq| {
        client
            .post(&url)
            .basic_auth(&key, Some(""))
            .json(&json!({"batch": [{
                "type": "track", "userId": format!("user-{}", seq % 100), "event": EVENT_NAME,
                "properties": {"seq": seq}, "messageId": format!("tick-{seq}")
            }]}))
    })
    .await?;
    server.stop().await?;

    eprintln!("baseline: {subscribers} subscribers of a plain WebSocket fan-out");
    let baseline = baseline(subscribers, events, rate, seconds).await?;
    let baseline_p99 = percentile(&baseline.latencies, 0.99);
    eprintln!(
        "baseline: p50 {} ms, p99 {baseline_p99} ms, {} of {} deliveries",
        percentile(&baseline.latencies, 0.50),
        baseline.latencies.len(),
        events * subscribers
    );
    let Measured {
        latencies,
        from_sent,
        ingest,
        lag_errors,
    } = measured;
    let deliveries = latencies.len();
    let p99 = percentile(&latencies, 0.99);
    Ok(RealtimeResult {
        scenario: "realtime",
        backend: db.backend.name(),
        figure:
            "p99 ms from commit to subscriber, GraphQL subscription over plain WebSocket fan-out",
        value: p99,
        baseline: baseline_p99,
        ratio: harness::round(p99 / baseline_p99.max(0.01), 3),
        baseline_p50_ms: percentile(&baseline.latencies, 0.50),
        baseline_missing: events * subscribers - baseline.latencies.len(),
        subscribers,
        events,
        rate_per_s: rate,
        deliveries,
        missing: events * subscribers - deliveries,
        lag_errors,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: p99,
        max_ms: percentile(&latencies, 1.0),
        p50_from_sent_ms: percentile(&from_sent, 0.50),
        p99_from_sent_ms: percentile(&from_sent, 0.99),
        ingest_p50_ms: percentile(&ingest, 0.50),
    })
}
