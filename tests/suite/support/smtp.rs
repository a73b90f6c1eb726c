//! In-process SMTP mail sink for black-box integration tests: it accepts SMTP from the service (plain text, or with STARTTLS or implicit TLS and a certificate the test made), records every message and can inject failure replies for retry tests.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// The maximum message size advertised in the EHLO reply.
const MAX_SIZE: usize = 10 * 1024 * 1024;

/// The maximum depth of nested multipart bodies that `ReceivedMail::text` descends into.
const MAX_MIME_DEPTH: usize = 16;

/// One message that the sink accepted with a final `250` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// The reverse path from `MAIL FROM`, without angle brackets (empty for the null sender `<>`).
    pub from: String,
    /// The forward paths from every `RCPT TO`, without angle brackets, in the order received.
    pub to: Vec<String>,
    /// The raw message (headers and body) with dot-stuffing removed and CRLF line endings kept.
    pub data: String,
    /// Whether the message arrived over TLS (implicit, or after STARTTLS).
    pub tls: bool,
}

impl ReceivedMail {
    /// Returns the unfolded value of the first top-level header called `name` (compared case-insensitively).
    pub fn header(&self, name: &str) -> Option<String> {
        let (headers, _) = split_entity(&self.data);
        find_header(&headers, name)
    }

    /// Returns the header like `header` does, with RFC 2047 encoded words (`=?utf-8?b?...?=`) decoded.
    pub fn decoded_header(&self, name: &str) -> Option<String> {
        self.header(name).map(|value| decode_encoded_words(&value))
    }

    /// Returns the decoded body text with line endings normalised to `\n`.
    ///
    /// A multipart message yields its `text/plain` and `text/html` parts (attachments excluded), decoded and joined with a newline; a single-part message yields its decoded body.
    pub fn text(&self) -> String {
        let mut parts = Vec::new();
        collect_text(&self.data, 0, &mut parts);
        parts.join("\n").replace("\r\n", "\n")
    }
}

/// How a sink offers TLS, with the certificate the test made.
#[derive(Clone)]
pub enum SinkTls {
    /// Advertises STARTTLS in its EHLO reply and upgrades when asked; mail without it is accepted too.
    StartTls(Arc<ServerConfig>),
    /// TLS from the first byte, as on port 465 (`smtps://`).
    Implicit(Arc<ServerConfig>),
}

/// State shared between the sink handle and the connection tasks.
struct Shared {
    /// Every stored message, in the order the final `.` was accepted.
    mails: Mutex<Vec<ReceivedMail>>,
    /// The reply codes to use instead of `250` for the next transactions, one per transaction.
    failures: Mutex<VecDeque<u16>>,
    /// Publishes the number of stored messages so that `wait_for` can wake up without polling.
    count: watch::Sender<usize>,
}

impl Shared {
    /// Stores a message and publishes the new count while the list is still locked, so the count never goes backwards.
    fn store(&self, mail: ReceivedMail) {
        let mut mails = self.mails.lock().unwrap_or_else(PoisonError::into_inner);
        mails.push(mail);
        let len = mails.len();
        self.count.send_replace(len);
    }

    /// Takes the next injected failure code, if any is queued.
    fn next_failure(&self) -> Option<u16> {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
    }
}

/// An SMTP server on `127.0.0.1` with an ephemeral port that records what it receives; dropping it stops the server.
pub struct SmtpSink {
    port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl SmtpSink {
    /// Binds `127.0.0.1:0` and starts accepting plain-text connections in a background task.
    pub async fn start() -> SmtpSink {
        SmtpSink::start_with(None).await
    }

    /// Binds `127.0.0.1:0` and starts accepting connections that use TLS as `tls` says.
    pub async fn start_tls(tls: SinkTls) -> SmtpSink {
        SmtpSink::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<SinkTls>) -> SmtpSink {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap_or_else(|e| panic!("the SMTP sink could not bind 127.0.0.1:0: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("the SMTP sink has no local address: {e}"))
            .port();
        let (count, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            mails: Mutex::new(Vec::new()),
            failures: Mutex::new(VecDeque::new()),
            count,
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared), tls));
        SmtpSink { port, shared, task }
    }

    /// Returns the port the sink listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Returns `smtp://127.0.0.1:{port}?tls=none`, the URL to put in the service configuration.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}?tls=none", self.port)
    }

    /// Returns `smtp://127.0.0.1:{port}` without a query, which lettre's `from_url` itself accepts as a plain connection.
    pub fn plain_url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Returns a copy of every message received so far.
    pub fn received(&self) -> Vec<ReceivedMail> {
        self.shared
            .mails
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until at least `count` messages have arrived or `timeout` has passed, then returns a copy of all messages received so far.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let mut rx = self.shared.count.subscribe();
        // A timeout is not an error here: the caller asserts on what was returned.
        let _ = tokio::time::timeout(timeout, rx.wait_for(|n| *n >= count)).await;
        self.received()
    }

    /// Makes the next `replies.len()` transactions end with the given codes instead of `250`, one code per transaction; those messages are not stored.
    ///
    /// A `421` reply also closes the connection, as RFC 5321 requires.
    pub fn fail_next(&self, replies: Vec<u16>) {
        self.shared
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(replies);
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        // Aborting the accept loop also drops its JoinSet, which aborts every open connection.
        self.task.abort();
    }
}

/// Accepts connections and serves each one in its own task until the sink is dropped.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<SinkTls>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, Arc::clone(&shared), tls.clone()));
                }
                Err(_) => {
                    // Accept errors such as EMFILE are transient; back off briefly instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Serves one connection; I/O errors (a failed TLS handshake among them) simply end it.
async fn serve(stream: TcpStream, shared: Arc<Shared>, tls: Option<SinkTls>) {
    let _ = connection(stream, &shared, tls).await;
}

/// Runs one connection: plain, TLS from the first byte, or plain until STARTTLS.
async fn connection(
    stream: TcpStream,
    shared: &Shared,
    tls: Option<SinkTls>,
) -> std::io::Result<()> {
    let plain = Mode {
        greet: true,
        offer_starttls: false,
        encrypted: false,
    };
    match tls {
        None => {
            session(stream, shared, plain).await?;
        }
        Some(SinkTls::Implicit(config)) => {
            let stream = TlsAcceptor::from(config).accept(stream).await?;
            let mode = Mode {
                encrypted: true,
                ..plain
            };
            session(stream, shared, mode).await?;
        }
        Some(SinkTls::StartTls(config)) => {
            let mode = Mode {
                offer_starttls: true,
                ..plain
            };
            if let Some(stream) = session(stream, shared, mode).await? {
                let stream = TlsAcceptor::from(config).accept(stream).await?;
                // RFC 3207: after the handshake the client starts over with EHLO and gets no new greeting.
                let mode = Mode {
                    greet: false,
                    encrypted: true,
                    ..plain
                };
                session(stream, shared, mode).await?;
            }
        }
    }
    Ok(())
}

/// What one SMTP dialogue on a stream does.
#[derive(Clone, Copy)]
struct Mode {
    /// Send the `220` greeting first (not after STARTTLS).
    greet: bool,
    /// Advertise and accept STARTTLS.
    offer_starttls: bool,
    /// The stream is already encrypted; recorded with each message.
    encrypted: bool,
}

/// Writes one reply line followed by CRLF, and flushes it.
async fn reply<W>(writer: &mut W, line: &str) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    writer.write_all(format!("{line}\r\n").as_bytes()).await?;
    writer.flush().await
}

/// Runs the SMTP dialogue on one stream; returns the stream when the client asked for STARTTLS.
async fn session<S>(stream: S, shared: &Shared, mode: Mode) -> std::io::Result<Option<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The reader is also the writer: tokio's BufReader passes writes through.
    let mut reader = BufReader::new(stream);
    if mode.greet {
        reply(&mut reader, "220 localhost ESMTP test sink ready").await?;
    }

    let mut from: Option<String> = None;
    let mut to: Vec<String> = Vec::new();
    let mut line = Vec::new();

    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        let command = String::from_utf8_lossy(&line);
        let command = command.trim_end_matches(['\r', '\n']);
        let verb = command
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let argument = command.get(verb.len()..).unwrap_or("").trim();

        match verb.as_str() {
            "EHLO" => {
                from = None;
                to.clear();
                let starttls = if mode.offer_starttls {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                };
                let ehlo = format!(
                    "250-localhost\r\n{starttls}250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE {MAX_SIZE}"
                );
                reply(&mut reader, &ehlo).await?;
            }
            "HELO" => {
                from = None;
                to.clear();
                reply(&mut reader, "250 localhost").await?;
            }
            "MAIL" => match path_argument(argument, "FROM:") {
                Some(path) => {
                    from = Some(path);
                    to.clear();
                    reply(&mut reader, "250 2.1.0 OK").await?;
                }
                None => reply(&mut reader, "501 5.5.4 syntax: MAIL FROM:<address>").await?,
            },
            "RCPT" => {
                if from.is_none() {
                    reply(&mut reader, "503 5.5.1 need MAIL before RCPT").await?;
                    continue;
                }
                match path_argument(argument, "TO:") {
                    Some(path) => {
                        to.push(path);
                        reply(&mut reader, "250 2.1.5 OK").await?;
                    }
                    None => reply(&mut reader, "501 5.5.4 syntax: RCPT TO:<address>").await?,
                }
            }
            "DATA" => {
                let Some(sender) = from.take() else {
                    reply(&mut reader, "503 5.5.1 need MAIL before DATA").await?;
                    continue;
                };
                if to.is_empty() {
                    from = Some(sender);
                    reply(&mut reader, "554 5.5.1 no valid recipients").await?;
                    continue;
                }
                let recipients = std::mem::take(&mut to);
                reply(&mut reader, "354 end data with <CR><LF>.<CR><LF>").await?;
                let Some(data) = read_data(&mut reader).await? else {
                    // The client closed the connection in the middle of the message.
                    return Ok(None);
                };
                match shared.next_failure() {
                    Some(code) => {
                        reply(&mut reader, &failure_reply(code)).await?;
                        if code == 421 {
                            return Ok(None);
                        }
                    }
                    None => {
                        shared.store(ReceivedMail {
                            from: sender,
                            to: recipients,
                            data,
                            tls: mode.encrypted,
                        });
                        reply(&mut reader, "250 2.0.0 OK queued").await?;
                    }
                }
            }
            "RSET" => {
                from = None;
                to.clear();
                reply(&mut reader, "250 2.0.0 OK").await?;
            }
            "NOOP" => reply(&mut reader, "250 2.0.0 OK").await?,
            "STARTTLS" if mode.offer_starttls => {
                reply(&mut reader, "220 2.0.0 ready to start TLS").await?;
                // Anything the client sent after STARTTLS in the clear is dropped with the buffer,
                // as RFC 3207 requires.
                return Ok(Some(reader.into_inner()));
            }
            "QUIT" => {
                reply(&mut reader, "221 2.0.0 bye").await?;
                return Ok(None);
            }
            _ => reply(&mut reader, "502 5.5.2 command not implemented").await?,
        }
    }
}

/// Reads message lines up to the terminating `.` line, undoing dot-stuffing; returns `None` on end of stream.
async fn read_data<R>(reader: &mut R) -> std::io::Result<Option<String>>
where
    R: AsyncBufReadExt + Unpin,
{
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(None);
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(Some(String::from_utf8_lossy(&data).into_owned()));
        }
        let content = if line.first() == Some(&b'.') {
            &line[1..]
        } else {
            &line[..]
        };
        data.extend_from_slice(content);
    }
}

/// Builds the reply line for an injected failure code.
fn failure_reply(code: u16) -> String {
    match code / 100 {
        4 => format!("{code} 4.3.0 try again later"),
        5 => format!("{code} 5.3.0 message rejected"),
        _ => format!("{code} injected reply"),
    }
}

/// Extracts the address from `FROM:<a@b> PARAMS` or `TO:<a@b>` (the keyword is matched case-insensitively).
fn path_argument(argument: &str, keyword: &str) -> Option<String> {
    let head = argument.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = argument[keyword.len()..].trim_start();
    if let Some(inner) = rest.strip_prefix('<') {
        let end = inner.find('>')?;
        Some(inner[..end].to_string())
    } else {
        let path = rest.split_whitespace().next()?;
        Some(path.to_string())
    }
}

/// Splits a MIME entity into its unfolded headers and its body.
fn split_entity(entity: &str) -> (Vec<(String, String)>, &str) {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut pos = 0;
    while pos < entity.len() {
        let (line, next) = match entity[pos..].find('\n') {
            Some(offset) => (&entity[pos..pos + offset], pos + offset + 1),
            None => (&entity[pos..], entity.len()),
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            return (headers, &entity[next..]);
        }
        if line.starts_with([' ', '\t']) {
            // Unfolding removes only the line break, so the leading whitespace of the continuation stays.
            if let Some((_, value)) = headers.last_mut() {
                value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_string(), value.to_string()));
        }
        pos = next;
    }
    (headers, "")
}

/// Finds the first header called `name`, case-insensitively, and returns its trimmed value.
fn find_header(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
}

/// Splits a structured header value such as `multipart/alternative; boundary="x"` at semicolons outside quotes.
fn split_params(value: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in value.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => {
                pieces.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    pieces.push(value[start..].trim());
    pieces
}

/// Returns the lower-cased main value of a structured header (such as the MIME type) and the value of parameter `param`.
fn header_param(value: &str, param: &str) -> (String, Option<String>) {
    let pieces = split_params(value);
    let main = pieces.first().copied().unwrap_or("").to_ascii_lowercase();
    let found = pieces.iter().skip(1).find_map(|piece| {
        let (name, v) = piece.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case(param) {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(v);
        Some(v.to_string())
    });
    (main, found)
}

/// Splits a multipart body into its parts (without the delimiter lines and the CRLF that precedes each delimiter).
fn split_multipart<'a>(body: &'a str, boundary: &str) -> Vec<&'a str> {
    let delimiter = format!("--{boundary}");
    let closing = format!("--{boundary}--");
    let mut parts = Vec::new();
    let mut current: Option<usize> = None;
    let mut pos = 0;
    while pos < body.len() {
        let next = match body[pos..].find('\n') {
            Some(offset) => pos + offset + 1,
            None => body.len(),
        };
        let line = body[pos..next].trim_end();
        if line == delimiter || line == closing {
            if let Some(start) = current {
                let part = &body[start..pos];
                let part = part
                    .strip_suffix("\r\n")
                    .or_else(|| part.strip_suffix('\n'))
                    .unwrap_or(part);
                parts.push(part);
            }
            if line == closing {
                return parts;
            }
            current = Some(next);
        }
        pos = next;
    }
    // A body without a closing delimiter still yields its last part.
    if let Some(start) = current {
        parts.push(&body[start..]);
    }
    parts
}

/// Appends the decoded text of `entity` (recursing into multipart bodies) to `out`.
fn collect_text(entity: &str, depth: usize, out: &mut Vec<String>) {
    if depth > MAX_MIME_DEPTH {
        return;
    }
    let (headers, body) = split_entity(entity);
    let content_type =
        find_header(&headers, "Content-Type").unwrap_or_else(|| "text/plain".to_string());
    let (mime, boundary) = header_param(&content_type, "boundary");
    if mime.starts_with("multipart/") {
        if let Some(boundary) = boundary {
            for part in split_multipart(body, &boundary) {
                collect_text(part, depth + 1, out);
            }
            return;
        }
    }
    if depth > 0 {
        let is_text = mime == "text/plain" || mime == "text/html";
        let is_attachment = find_header(&headers, "Content-Disposition")
            .map(|d| header_param(&d, "").0 == "attachment")
            .unwrap_or(false);
        if !is_text || is_attachment {
            return;
        }
    }
    let encoding = find_header(&headers, "Content-Transfer-Encoding")
        .unwrap_or_default()
        .to_ascii_lowercase();
    let decoded = match encoding.as_str() {
        "quoted-printable" => decode_quoted_printable(body.as_bytes(), false),
        "base64" => decode_base64(body.as_bytes()),
        _ => body.as_bytes().to_vec(),
    };
    out.push(String::from_utf8_lossy(&decoded).into_owned());
}

/// Returns the value of one hexadecimal digit.
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes quoted-printable (RFC 2045); with `q_encoding` set, `_` means a space as in RFC 2047 Q-encoded words.
fn decode_quoted_printable(input: &[u8], q_encoding: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        if b == b'_' && q_encoding {
            out.push(b' ');
            i += 1;
            continue;
        }
        if b != b'=' {
            out.push(b);
            i += 1;
            continue;
        }
        // A soft line break is `=` followed by optional trailing whitespace and a line ending.
        let mut j = i + 1;
        while j < input.len() && (input[j] == b' ' || input[j] == b'\t') {
            j += 1;
        }
        if input.get(j) == Some(&b'\r') && input.get(j + 1) == Some(&b'\n') {
            i = j + 2;
            continue;
        }
        if input.get(j) == Some(&b'\n') {
            i = j + 1;
            continue;
        }
        if j == input.len() {
            i = j;
            continue;
        }
        let high = input.get(i + 1).copied().and_then(hex_value);
        let low = input.get(i + 2).copied().and_then(hex_value);
        match (high, low) {
            (Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            _ => {
                // A malformed escape is kept literally, as RFC 2045 suggests.
                out.push(b'=');
                i += 1;
            }
        }
    }
    out
}

/// Decodes base64 (standard or URL-safe alphabet), skipping whitespace and stopping at padding.
fn decode_base64(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &b in input {
        let value = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            _ => continue,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
            buffer &= (1 << bits) - 1;
        }
    }
    out
}

/// Decodes one RFC 2047 encoded word `=?charset?B|Q?text?=`, assuming a UTF-8 compatible charset.
fn decode_encoded_word(word: &str) -> Option<Vec<u8>> {
    let inner = word.strip_prefix("=?")?.strip_suffix("?=")?;
    let mut fields = inner.splitn(3, '?');
    let _charset = fields.next()?;
    let encoding = fields.next()?;
    let text = fields.next()?;
    match encoding {
        "B" | "b" => Some(decode_base64(text.as_bytes())),
        "Q" | "q" => Some(decode_quoted_printable(text.as_bytes(), true)),
        _ => None,
    }
}

/// Decodes every RFC 2047 encoded word in a header value; whitespace between adjacent encoded words is dropped.
fn decode_encoded_words(value: &str) -> String {
    let mut out: Vec<u8> = Vec::new();
    let mut pending_space = String::new();
    let mut previous_was_encoded = false;
    for token in split_keep_whitespace(value) {
        if token.trim().is_empty() {
            pending_space.push_str(token);
            continue;
        }
        match decode_encoded_word(token) {
            Some(bytes) => {
                if !previous_was_encoded {
                    out.extend_from_slice(pending_space.as_bytes());
                }
                out.extend_from_slice(&bytes);
                previous_was_encoded = true;
            }
            None => {
                out.extend_from_slice(pending_space.as_bytes());
                out.extend_from_slice(token.as_bytes());
                previous_was_encoded = false;
            }
        }
        pending_space.clear();
    }
    out.extend_from_slice(pending_space.as_bytes());
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits a string into alternating runs of whitespace and non-whitespace.
fn split_keep_whitespace(value: &str) -> Vec<&str> {
    let mut tokens = Vec::new();
    let mut start = 0;
    let mut in_space: Option<bool> = None;
    for (i, c) in value.char_indices() {
        let space = c.is_whitespace();
        if in_space.is_some_and(|s| s != space) {
            tokens.push(&value[start..i]);
            start = i;
        }
        in_space = Some(space);
    }
    if start < value.len() {
        tokens.push(&value[start..]);
    }
    tokens
}
