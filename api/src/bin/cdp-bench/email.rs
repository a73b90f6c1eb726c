//! `email`: campaign email throughput through the durable outbox to an SMTP listener in this
//! process, with a check that no email is lost and none is sent twice.
//!
//! A first server (no outbox workers) ingests N consenting profiles with an email address and
//! activates a broadcast campaign to all of them, which queues N emails in one transaction. A
//! second server with `--workers` outbox workers then sends them to the local SMTP listener; the
//! clock runs from its start until the listener has N campaign messages. Every Message-ID is
//! checked: `lost` are queued emails that never arrived, `duplicates` are Message-IDs received
//! more than once.
//!
//! The baseline sends the same number of emails (a subject and a two-part body of the same
//! size) straight from the bench to a second listener of the same kind with lettre, as many at
//! once as the workers do (8 per worker), without a database: the floor that SMTP over loopback
//! sets. `ratio` is the outbox's emails per second over the baseline's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use api::config::Config;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::harness::{self, BackendArgs, BenchDb, Server};

#[derive(Debug, Clone, clap::Args)]
pub struct EmailArgs {
    #[command(flatten)]
    pub backends: BackendArgs,
    /// Campaign emails to queue and send.
    #[arg(long, default_value_t = 5000)]
    pub emails: usize,
    /// Outbox workers of the sending server.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// A short run (1000 emails).
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Serialize)]
struct EmailResult {
    scenario: &'static str,
    backend: &'static str,
    emails: usize,
    workers: usize,
    /// Seconds `setCampaignStatus(ACTIVE)` took to queue every email of the broadcast.
    queue_seconds: f64,
    send_seconds: f64,
    emails_per_second: f64,
    figure: &'static str,
    value: f64,
    /// Emails per second sent straight to an SMTP listener, without the outbox.
    baseline: f64,
    ratio: f64,
    lost: usize,
    duplicates: usize,
}

pub async fn run(args: EmailArgs) -> anyhow::Result<()> {
    let emails = if args.quick { 1000 } else { args.emails };
    let workers = args.workers.max(1);
    harness::on_each_backend(&args.backends, |db| async move {
        measure(&db, emails, workers).await
    })
    .await
}

async fn measure(db: &BenchDb, emails: usize, workers: usize) -> anyhow::Result<EmailResult> {
    let sink = Sink::start().await?;

    // Queue: profiles, a segment of all of them, and a broadcast campaign, on a server that sends
    // nothing.
    let server = Server::start(db).await?;
    let owner = server.sign_up("email").await?;
    let key = server.write_key(&owner).await?;
    eprintln!("ingesting {emails} profiles");
    for chunk in (0..emails).collect::<Vec<_>>().chunks(500) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|n| {
                json!({"type": "identify", "userId": format!("u{n}"), "messageId": format!("m{n}"),
                    "traits": {"email": format!("u{n}@bench.example"), "firstName": format!("U{n}"), "plan": "bench"},
                    "context": {"consent": {"categoryPreferences": {"email_marketing": true}}}})
            })
            .collect();
        server
            .client
            .post(server.url("/v1/batch"))
            .basic_auth(&key, Some(""))
            .json(&json!({"batch": batch}))
            .send()
            .await?
            .error_for_status()?;
    }
    let data = server
        .graphql(
            &owner.access_token,
            r#"mutation { createSegment(input: {name: "All", condition: {trait: "plan", op: "eq", value: "bench"}}) { id status } }"#,
            json!({}),
        )
        .await?;
    let segment = data
        .pointer("/createSegment/id")
        .and_then(|id| id.as_str())
        .context("createSegment returned no id")?
        .to_owned();
    let data = server
        .graphql(
            &owner.access_token,
            "mutation($input: CampaignInput!) { createCampaign(input: $input) { id } }",
            json!({"input": {"name": "Bench", "trigger": {"broadcastSegment": segment},
                "subject": "Hello {{ profile.traits.firstName }}",
                "textBody": "Hi {{ profile.traits.firstName }}, unsubscribe: {{ unsubscribe_url }}",
                "htmlBody": "<p>Hi {{ profile.traits.firstName }}</p><a href=\"{{ unsubscribe_url }}\">unsubscribe</a>"}}),
        )
        .await?;
    let campaign = data
        .pointer("/createCampaign/id")
        .and_then(|id| id.as_str())
        .context("createCampaign returned no id")?
        .to_owned();
    let started = Instant::now();
    let data = server
        .graphql(
            &owner.access_token,
            "mutation($id: ID!) { setCampaignStatus(id: $id, status: ACTIVE) { stats { queued suppressed } } }",
            json!({"id": campaign}),
        )
        .await?;
    let queue_seconds = started.elapsed().as_secs_f64();
    let queued = data
        .pointer("/setCampaignStatus/stats/queued")
        .and_then(|n| n.as_u64())
        .unwrap_or(0) as usize;
    if queued != emails {
        bail!("the broadcast queued {queued} emails, expected {emails}");
    }
    server.stop().await?;

    // Send: a server with `workers` outbox workers, timed until every email arrived.
    eprintln!("sending {emails} emails with {workers} workers");
    let mut config = Config::for_tests(&db.data_dir, &db.service_url);
    config.outbox_workers = workers;
    config.database_max_connections = 10;
    config.database_min_connections = 10;
    config.smtp_url = Some(format!("smtp://127.0.0.1:{}?tls=none", sink.port));
    config.log_filter = "warn".to_owned();
    let started = Instant::now();
    let app = api::startup::build(config).await?;
    let arrived = sink
        .wait_for_campaign_mails(emails, Duration::from_secs(600))
        .await;
    let send_seconds = started.elapsed().as_secs_f64();
    // Let the workers record what they sent, then count every Message-ID once more.
    app.stop().await?;
    let ids = sink.campaign_ids();
    let distinct = ids.len();
    let received: usize = ids.values().sum();
    if arrived < emails {
        eprintln!("warning: only {arrived} of {emails} emails arrived within the time limit");
    }
    let rate = distinct as f64 / send_seconds;
    let baseline = baseline(emails, workers * 8).await?;
    eprintln!("baseline: {emails} emails straight to SMTP, {baseline:.0}/s");
    Ok(EmailResult {
        scenario: "email",
        backend: db.backend.name(),
        emails,
        workers,
        queue_seconds: harness::round(queue_seconds, 3),
        send_seconds: harness::round(send_seconds, 3),
        emails_per_second: harness::round(rate, 1),
        figure: "emails/s, outbox over straight SMTP sends",
        value: harness::round(rate, 1),
        baseline: harness::round(baseline, 1),
        ratio: harness::round(rate / baseline.max(1e-9), 3),
        lost: emails.saturating_sub(distinct),
        duplicates: received - distinct,
    })
}

/// Emails per second sent straight to a fresh sink with lettre, `concurrency` at once over a
/// pooled transport, until the sink has counted all of them.
async fn baseline(emails: usize, concurrency: usize) -> anyhow::Result<f64> {
    use futures::StreamExt;
    use lettre::message::MultiPart;
    use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
    let sink = Sink::start().await?;
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.port)
        .pool_config(lettre::transport::smtp::PoolConfig::new().max_size(concurrency as u32))
        .build();
    let started = Instant::now();
    let results: Vec<Result<(), String>> = futures::stream::iter(0..emails)
        .map(|n| {
            let transport = transport.clone();
            async move {
                let message = Message::builder()
                    .from("Bench <bench@example.com>".parse().map_err(|e| format!("{e}"))?)
                    .to(format!("u{n}@bench.example").parse().map_err(|e| format!("{e}"))?)
                    .message_id(Some(format!("<baseline-{n}@campaign.cdp>")))
                    .subject(format!("Hello U{n}"))
                    .multipart(MultiPart::alternative_plain_html(
                        format!("Hi U{n}, unsubscribe: https://cdp.example/unsubscribe?t={n}"),
                        format!("<p>Hi U{n}</p><a href=\"https://cdp.example/unsubscribe?t={n}\">unsubscribe</a>"),
                    ))
                    .map_err(|error| error.to_string())?;
                transport
                    .send(message)
                    .await
                    .map(|_| ())
                    .map_err(|error| error.to_string())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    if let Some(Err(error)) = results.into_iter().find(Result::is_err) {
        bail!("a baseline send failed: {error}");
    }
    let arrived = sink
        .wait_for_campaign_mails(emails, Duration::from_secs(60))
        .await;
    if arrived < emails {
        bail!("only {arrived} of {emails} baseline emails arrived");
    }
    Ok(emails as f64 / started.elapsed().as_secs_f64())
}

/// A minimal SMTP server on loopback that accepts every message and counts campaign messages by
/// Message-ID.
struct Sink {
    port: u16,
    /// Campaign Message-ID → times received.
    ids: Arc<Mutex<HashMap<String, usize>>>,
    count: watch::Receiver<usize>,
}

impl Sink {
    async fn start() -> anyhow::Result<Sink> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let ids = Arc::new(Mutex::new(HashMap::new()));
        let (count_tx, count) = watch::channel(0usize);
        let count_tx = Arc::new(count_tx);
        let shared = ids.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let ids = shared.clone();
                let count_tx = count_tx.clone();
                tokio::spawn(async move {
                    if let Err(error) = serve(stream, ids, count_tx).await {
                        eprintln!("smtp sink: {error}");
                    }
                });
            }
        });
        Ok(Sink { port, ids, count })
    }

    async fn wait_for_campaign_mails(&self, count: usize, timeout: Duration) -> usize {
        let mut receiver = self.count.clone();
        let _ = tokio::time::timeout(timeout, receiver.wait_for(|n| *n >= count)).await;
        *self.count.borrow()
    }

    fn campaign_ids(&self) -> HashMap<String, usize> {
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

async fn serve(
    stream: tokio::net::TcpStream,
    ids: Arc<Mutex<HashMap<String, usize>>>,
    count: Arc<watch::Sender<usize>>,
) -> anyhow::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    writer.write_all(b"220 bench ESMTP\r\n").await?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => writer.write_all(b"250-bench\r\n250 8BITMIME\r\n").await?,
            "DATA" => {
                writer.write_all(b"354 go ahead\r\n").await?;
                let mut message_id = None;
                let mut in_headers = true;
                loop {
                    line.clear();
                    if reader.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" || line == ".\n" {
                        break;
                    }
                    if in_headers {
                        if line.trim_end().is_empty() {
                            in_headers = false;
                        } else if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("message-id") {
                                message_id = Some(value.trim().to_owned());
                            }
                        }
                    }
                }
                if let Some(id) = message_id.filter(|id| id.contains("@campaign.cdp")) {
                    let mut ids = ids.lock().unwrap_or_else(PoisonError::into_inner);
                    *ids.entry(id).or_insert(0) += 1;
                    let distinct = ids.len();
                    drop(ids);
                    count.send_replace(distinct);
                }
                writer.write_all(b"250 2.0.0 queued\r\n").await?;
            }
            "QUIT" => {
                writer.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => writer.write_all(b"250 ok\r\n").await?,
        }
    }
}
