//! The reference of every environment variable: the tables of `docs/configuration.md` are
//! generated from it (`cdp config`), and a test holds the file to it.

/// Which table of the reference a variable is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// The main table.
    General,
    /// "Abuse limits".
    Abuse,
}

/// One variable: its name, its default as the reference shows it (a parsed default in
/// backquotes, exactly as `Config::from_env` parses it), and what it means (Markdown).
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub section: Section,
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

pub const VARIABLES: &[Variable] = &[
    Variable {
        section: Section::General,
        name: "CDP_DATABASE_URL",
        default: "`sqlite://$CDP_DATA_DIR/cdp.db?mode=rwc`",
        meaning: "`postgres://user@host:5432/db` for PostgreSQL; `?sslmode=require` for TLS, `?sslmode=verify-full&sslrootcert=/path/ca.pem` to check the server's certificate too; without `sslmode`, a server on loopback is reached without TLS (`operations.md`, TLS)",
    },
    Variable {
        section: Section::General,
        name: "CDP_DATABASE_MAX_CONNECTIONS",
        default: "`10`",
        meaning: "connection pool size",
    },
    Variable {
        section: Section::General,
        name: "CDP_DATABASE_MIN_CONNECTIONS",
        default: "`CDP_DATABASE_MAX_CONNECTIONS`",
        meaning: "connections opened at start and kept open, so that no request waits for one to open (`operations.md`, sizing)",
    },
    Variable {
        section: Section::General,
        name: "CDP_DATA_DIR",
        default: "`./data`",
        meaning: "generated secrets, the SQLite file, the mailbox folder",
    },
    Variable {
        section: Section::General,
        name: "CDP_LISTEN",
        default: "`127.0.0.1:8080`",
        meaning: "address to serve on",
    },
    Variable {
        section: Section::General,
        name: "CDP_TLS_CERT",
        default: "none: plain HTTP",
        meaning: "a PEM file with the server certificate, then any intermediates; with `CDP_TLS_KEY` the listener serves HTTPS and WSS only (`operations.md`, TLS)",
    },
    Variable {
        section: Section::General,
        name: "CDP_TLS_KEY",
        default: "none",
        meaning: "a PEM file with the private key of `CDP_TLS_CERT` (PKCS#8, PKCS#1 or SEC1); one of the two without the other stops the start",
    },
    Variable {
        section: Section::General,
        name: "CDP_PUBLIC_URL",
        default: "`http://{CDP_LISTEN}` (`https://…` with `CDP_TLS_CERT`)",
        meaning: "the address in email links, including the one-click unsubscribe link of campaign emails (`{CDP_PUBLIC_URL}/unsubscribe?token=…`)",
    },
    Variable {
        section: Section::General,
        name: "CDP_JWT_SECRET",
        default: "generated into `$CDP_DATA_DIR/jwt-secret`",
        meaning: "HS256 key for access tokens, at least 32 characters; every replica needs the same",
    },
    Variable {
        section: Section::General,
        name: "CDP_ENCRYPTION_KEY",
        default: "generated into `$CDP_DATA_DIR/encryption-key`",
        meaning: "32 bytes, base64; the master key: it wraps every tenant's key, which seals personal data and signs unsubscribe links and webhook secrets (ADR 0007). Without it the personal data in the database cannot be read: keep it in a secret store, apart from backups. Change it only by rotation (`docs/operations.md`)",
    },
    Variable {
        section: Section::General,
        name: "CDP_ENCRYPTION_KEY_PREVIOUS",
        default: "none",
        meaning: "comma-separated earlier master keys (base64), accepted for unwrapping tenant keys while `cdp keys rotate` runs",
    },
    Variable {
        section: Section::General,
        name: "CDP_SMTP_URL",
        default: "none: `.eml` files in `$CDP_DATA_DIR/mail`",
        meaning: "`smtp://user:pass@host:587` (STARTTLS when offered), `smtp://…?tls=required`, `smtps://user:pass@host:465`, `smtp://host:25?tls=none` (a local relay)",
    },
    Variable {
        section: Section::General,
        name: "CDP_SMTP_CA_CERT",
        default: "none: the public roots only",
        meaning: "a PEM file of CA certificates that the SMTP server's certificate may chain to, trusted besides the public roots (a relay with a private CA)",
    },
    Variable {
        section: Section::General,
        name: "CDP_MAIL_FROM",
        default: "`CDP <no-reply@localhost>`",
        meaning: "sender of every email",
    },
    Variable {
        section: Section::General,
        name: "CDP_CORS_ORIGINS",
        default: "none (same origin only)",
        meaning: "comma-separated origins, or `*`, that browsers may call `/graphql` from",
    },
    Variable {
        section: Section::General,
        name: "CDP_LOG",
        default: "`info`",
        meaning: "a tracing filter, for example `info,api=debug`",
    },
    Variable {
        section: Section::General,
        name: "CDP_LOG_FORMAT",
        default: "text",
        meaning: "`json` for JSON lines; every line written while serving a request carries its `request_id`",
    },
    Variable {
        section: Section::General,
        name: "CDP_METRICS_TOKEN",
        default: "none: `/metrics` is open",
        meaning: "with a value, `/metrics` answers only `Authorization: Bearer <value>` (401 otherwise)",
    },
    Variable {
        section: Section::General,
        name: "CDP_DRAIN_DELAY_SECS",
        default: "`0`",
        meaning: "after SIGTERM, how long `/readyz` answers 503 while requests are still served, so that a load balancer stops routing to the process first",
    },
    Variable {
        section: Section::General,
        name: "CDP_SHUTDOWN_TIMEOUT_SECS",
        default: "`20`",
        meaning: "then, how long in-flight requests, the email being sent and background jobs get before the process exits anyway",
    },
    Variable {
        section: Section::General,
        name: "CDP_GRAPHQL_MAX_DEPTH",
        default: "`16`",
        meaning: "deepest selection nesting",
    },
    Variable {
        section: Section::General,
        name: "CDP_GRAPHQL_MAX_COMPLEXITY",
        default: "`5000`",
        meaning: "highest query complexity",
    },
    Variable {
        section: Section::General,
        name: "CDP_GRAPHQL_MAX_BODY_BYTES",
        default: "`1048576`",
        meaning: "largest `/graphql` body (413 above)",
    },
    Variable {
        section: Section::General,
        name: "CDP_GRAPHQL_MAX_BATCH",
        default: "`10`",
        meaning: "most operations in one batched request",
    },
    Variable {
        section: Section::General,
        name: "CDP_GRAPHQL_APQ_CAPACITY",
        default: "`1000`",
        meaning: "automatic persisted queries remembered per process, the oldest forgotten first; `0` turns them off",
    },
    Variable {
        section: Section::General,
        name: "CDP_GRAPHQL_GET_MAX_AGE_SECS",
        default: "`5`",
        meaning: "`Cache-Control: private, max-age=…` of a GET query answered without errors; `0`: `private, no-cache`",
    },
    Variable {
        section: Section::General,
        name: "CDP_GRAPHQL_COMPILED_PLANS",
        default: "`true`",
        meaning: "answer the hottest read shapes (`profile(id)`, `profiles` pages with a profile's own fields and its first events) by compiled plans, with the JSON the schema answers; `false` runs every operation through the schema (ADR 0016)",
    },
    Variable {
        section: Section::General,
        name: "CDP_INGEST_MAX_BODY_BYTES",
        default: "`16777216`",
        meaning: "hard cap on a collection API body, compressed or not; per-tenant limits apply below it",
    },
    Variable {
        section: Section::General,
        name: "CDP_INGEST_GROUP_COMMIT",
        default: "`auto`",
        meaning: "`on`: one writer task per tenant and process writes all waiting ingestion requests in one transaction; `off`: one transaction per request; `auto`: on for SQLite, off for PostgreSQL (see PERFORMANCE.md)",
    },
    Variable {
        section: Section::General,
        name: "CDP_INGEST_WRITERS",
        default: "`1`",
        meaning: "writer tasks per tenant and process when group commit is on; each groups the requests that reach it, and they write concurrently",
    },
    Variable {
        section: Section::General,
        name: "CDP_ACCESS_TOKEN_TTL_SECS",
        default: "`900`",
        meaning: "access token lifetime",
    },
    Variable {
        section: Section::General,
        name: "CDP_REFRESH_TOKEN_TTL_SECS",
        default: "`2592000`",
        meaning: "refresh token lifetime (30 days)",
    },
    Variable {
        section: Section::General,
        name: "CDP_ACTIVATION_TOKEN_TTL_SECS",
        default: "`259200`",
        meaning: "activation link lifetime (72 h)",
    },
    Variable {
        section: Section::General,
        name: "CDP_RESET_TOKEN_TTL_SECS",
        default: "`3600`",
        meaning: "password reset link lifetime",
    },
    Variable {
        section: Section::General,
        name: "CDP_LOGIN_MAX_FAILURES",
        default: "`5`",
        meaning: "failed logins per account before RATE_LIMITED",
    },
    Variable {
        section: Section::General,
        name: "CDP_LOGIN_THROTTLE_WINDOW_SECS",
        default: "`900`",
        meaning: "the window those failures count in",
    },
    Variable {
        section: Section::General,
        name: "CDP_OUTBOX_WORKERS",
        default: "`1`",
        meaning: "email sending workers in this process (0: this process sends none)",
    },
    Variable {
        section: Section::General,
        name: "CDP_OUTBOX_POLL_MS",
        default: "`1000`",
        meaning: "how often an idle worker looks for due email",
    },
    Variable {
        section: Section::General,
        name: "CDP_OUTBOX_MAX_ATTEMPTS",
        default: "`8`",
        meaning: "attempts before an email (account or campaign) is FAILED",
    },
    Variable {
        section: Section::General,
        name: "CDP_OUTBOX_LEASE_SECS",
        default: "`120`",
        meaning: "how long a claimed email stays claimed before another worker may retry it",
    },
    Variable {
        section: Section::General,
        name: "CDP_OUTBOX_BACKOFF_MS",
        default: "`30000`",
        meaning: "first retry delay; doubles per attempt, with jitter, at most an hour",
    },
    Variable {
        section: Section::General,
        name: "CDP_SCHEDULER_TICK_SECS",
        default: "`300`",
        meaning: "how often the scheduler re-evaluates time-dependent segments and stages, recomputes RFM and churn risk and takes the day's segment sizes (0: this process runs no scheduler); with several replicas each tenant is ticked once per interval between them (`operations.md`, \"Several replicas\")",
    },
    Variable {
        section: Section::General,
        name: "CDP_SCHEDULER_BATCH",
        default: "`500`",
        meaning: "profiles the scheduler changes per transaction",
    },
    Variable {
        section: Section::General,
        name: "CDP_EVENTS_RETENTION_DAYS",
        default: "unset (keep forever)",
        meaning: "the platform's longest retention of events, in days. With a partitioned events table (`cdp events partition`, PostgreSQL) the scheduler drops every partition whose whole range is older than this, and deletes older rows of the DEFAULT partition; tenants whose `eventRetentionDays` is shorter keep losing rows by their own setting. Without partitions it changes nothing (see `operations.md`, \"Events partitioned by time\")",
    },
    Variable {
        section: Section::General,
        name: "CDP_WEBHOOK_WORKERS",
        default: "`1`",
        meaning: "webhook sending workers in this process (0: this process sends none)",
    },
    Variable {
        section: Section::General,
        name: "CDP_WEBHOOK_POLL_MS",
        default: "`1000`",
        meaning: "how often an idle webhook worker looks for due deliveries",
    },
    Variable {
        section: Section::General,
        name: "CDP_WEBHOOK_MAX_ATTEMPTS",
        default: "`8`",
        meaning: "attempts before a webhook delivery is FAILED",
    },
    Variable {
        section: Section::General,
        name: "CDP_WEBHOOK_BACKOFF_MS",
        default: "`30000`",
        meaning: "first webhook retry delay; doubles per attempt, with jitter, at most an hour",
    },
    Variable {
        section: Section::General,
        name: "CDP_WEBHOOK_TIMEOUT_SECS",
        default: "`10`",
        meaning: "how long one webhook request may take (a claim's lease is twice this plus 30 s)",
    },
    Variable {
        section: Section::General,
        name: "CDP_WEBHOOK_ALLOW_HTTP",
        default: "`false`",
        meaning: "`true` also accepts `http://localhost`, `http://127.0.0.1` and `http://[::1]` webhook URLs and lifts the private-address check (development and tests only)",
    },
    Variable {
        section: Section::General,
        name: "CDP_SEGMENT_BUILD_WAIT_SECS",
        default: "`10`",
        meaning: "how long `createSegment`/`updateSegment` wait for the build before answering with status `BUILDING` (the build goes on)",
    },
    Variable {
        section: Section::General,
        name: "CDP_WS_MAX_SOCKETS_PER_TENANT",
        default: "`1000`",
        meaning: "authenticated `/graphql/ws` sockets one tenant may hold open in this process; more are closed with 4403 (`docs/realtime.md`)",
    },
    Variable {
        section: Section::General,
        name: "CDP_WS_MAX_SUBSCRIPTIONS_PER_TENANT",
        default: "`5000`",
        meaning: "active subscriptions one tenant may hold in this process, over all its sockets; more end at once with RATE_LIMITED",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_RATE_LIMIT_GRAPHQL_PER_IP",
        default: "`1200`",
        meaning: "GraphQL operations per minute from one client address: every operation of a `POST /graphql` (each of a batch) and every `/graphql/ws` connect; over it, 429 with `Retry-After` and RATE_LIMITED (0: no limit)",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_RATE_LIMIT_GRAPHQL_PER_TENANT",
        default: "`6000`",
        meaning: "GraphQL operations per minute of one tenant, from its principal (user or api key): every operation over HTTP, every `connection_init` (refused with close 4429) and every operation over a socket (0: no limit)",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_RATE_LIMIT_INGEST_PER_IP",
        default: "`12000`",
        meaning: "collection API (`/v1/*`) requests per minute from one client address, counted before the key is checked; 429 `rate_limited` with `Retry-After` (0: no limit). Each tenant's messages-per-second limit (`rateLimitPerSecond`) applies as well",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_RATE_LIMIT_BURST_SECS",
        default: "`10`",
        meaning: "how many seconds' worth of each rate above may be spent at once (at least one request)",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_TRUSTED_PROXIES",
        default: "none",
        meaning: "comma-separated addresses or CIDR blocks (`10.0.0.0/8, ::1`) of reverse proxies whose `X-Forwarded-For` is believed; the client is then the last address in that header not itself trusted. Without it the client is the peer address, whatever the header says. The audit log records the same address",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_PASSWORD_HASH_CONCURRENCY",
        default: "`0` (one per CPU core)",
        meaning: "password hashes (argon2id, about 19 MiB each) computed at once on the blocking pool; logins, activations and resets beyond it wait",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_PASSWORD_HASH_QUEUE",
        default: "`256`",
        meaning: "logins, activations and resets that may wait for a hashing slot; the next one is refused at once with RATE_LIMITED (`retryAfter` 1)",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_REQUEST_TIMEOUT_SECS",
        default: "`30`",
        meaning: "how long an HTTP request may take; a longer one is stopped and answered 503 (GraphQL: an INTERNAL error; elsewhere `{\"success\": false, \"code\": \"timeout\", \"message\"}`). `/graphql/ws` sockets are not limited (0: no limit)",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_WS_MAX_MESSAGE_BYTES",
        default: "`65536`",
        meaning: "largest message (and frame) a client may send on `/graphql/ws`; a larger one closes the socket with 1009 (Message Too Big)",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_GRAPHQL_MAX_ROOT_FIELDS",
        default: "`30`",
        meaning: "root fields one operation may select, aliases included and fragments expanded as often as they are spread; more is BAD_USER_INPUT and nothing runs",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_GRAPHQL_MAX_ACCOUNT_FIELDS",
        default: "`1`",
        meaning: "`signUp`, `activateAccount`, `login`, `refreshSession`, `requestPasswordReset` and `resetPassword` one operation may hold (aliases and fragments included), and one batched request over all its operations; more is BAD_USER_INPUT and nothing runs",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_GRAPHQL_INTROSPECTION",
        default: "`true`",
        meaning: "`false` refuses `__schema` and `__type` (BAD_USER_INPUT); GraphiQL then has no schema to explore. `cdp schema` prints the SDL either way",
    },
    Variable {
        section: Section::Abuse,
        name: "CDP_GRAPHQL_SUGGESTIONS",
        default: "`true`",
        meaning: "`false` leaves \"Did you mean …?\" out of error messages",
    },
];

/// The Markdown table of one section, as `docs/configuration.md` holds it.
pub fn table(section: Section) -> String {
    let mut table = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for variable in VARIABLES
        .iter()
        .filter(|variable| variable.section == section)
    {
        table.push_str(&format!(
            "| `{}` | {} | {} |\n",
            variable.name, variable.default, variable.meaning
        ));
    }
    table
}

/// Each table between the markers `docs/configuration.md` has around it.
pub fn blocks() -> Vec<String> {
    [(Section::General, "general"), (Section::Abuse, "abuse")]
        .into_iter()
        .map(|(section, name)| {
            format!(
                "<!-- cdp config: {name} -->\n{}<!-- end cdp config: {name} -->\n",
                table(section)
            )
        })
        .collect()
}

/// Both tables, as `cdp config` prints them.
pub fn markdown() -> String {
    blocks().join("\n")
}
