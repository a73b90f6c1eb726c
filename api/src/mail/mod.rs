//! Sending email with lettre: over SMTP when `CDP_SMTP_URL` is set, otherwise as `.eml` files in
//! the mailbox folder of the data directory.
//!
//! TLS to the SMTP server (STARTTLS or `smtps://`) verifies the server's certificate against the
//! public roots plus the CA certificates of `CDP_SMTP_CA_CERT`, and the host name of the URL; a
//! certificate that fails either check fails the send, it never falls back to plain text.
//!
//! Guarantees: addresses are parsed by lettre (a CR or LF in one is refused), header values are
//! encoded by lettre, and a custom header name must be plain ASCII; a message that cannot be built
//! is a permanent failure, never a retry loop.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;

/// How to reach the SMTP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// `smtp://…?tls=none`: plain text, for a local relay only.
    None,
    /// `smtp://…`: STARTTLS when the server offers it.
    StartTlsWhenOffered,
    /// `smtp://…?tls=required`: STARTTLS or fail.
    StartTlsRequired,
    /// `smtps://…`: TLS from the first byte.
    Tls,
}

/// Parses the SMTP URL forms of the service contract.
pub fn parse_smtp_url(url: &str) -> anyhow::Result<SmtpSettings> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| anyhow::anyhow!("expected smtp://… or smtps://…"))?;
    let (authority, query) = match rest.split_once('?') {
        Some((authority, query)) => (authority.trim_end_matches('/'), Some(query)),
        None => (rest.trim_end_matches('/'), None),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) => (
            host.to_owned(),
            Some(
                port.parse::<u16>()
                    .map_err(|_| anyhow::anyhow!("invalid port {port:?}"))?,
            ),
        ),
        None => (hostport.to_owned(), None),
    };
    if host.is_empty() {
        anyhow::bail!("the URL names no host");
    }
    let tls_param = query
        .into_iter()
        .flat_map(|query| query.split('&'))
        .find_map(|pair| pair.strip_prefix("tls="));
    let security = match (scheme, tls_param) {
        ("smtps", None) => SmtpSecurity::Tls,
        ("smtp", None | Some("opportunistic")) => SmtpSecurity::StartTlsWhenOffered,
        ("smtp", Some("none")) => SmtpSecurity::None,
        ("smtp", Some("required")) => SmtpSecurity::StartTlsRequired,
        (scheme, tls) => {
            anyhow::bail!("unsupported combination: scheme {scheme:?} with tls={tls:?}")
        }
    };
    let port = port.unwrap_or(match security {
        SmtpSecurity::Tls => 465,
        _ => 587,
    });
    let (username, password) = match userinfo {
        Some(info) => {
            let (user, pass) = info.split_once(':').unwrap_or((info, ""));
            (Some(percent_decode(user)), Some(percent_decode(pass)))
        }
        None => (None, None),
    };
    Ok(SmtpSettings {
        host,
        port,
        security,
        username,
        password,
    })
}

/// Reads the CA certificates of a PEM file (`CDP_SMTP_CA_CERT`); at least one.
pub fn read_ca_certificates(path: &Path) -> anyhow::Result<Vec<Certificate>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .map(|certificate| {
            let certificate = certificate
                .map_err(|error| anyhow::anyhow!("{} is not valid PEM: {error}", path.display()))?;
            Certificate::from_der(certificate.to_vec())
                .with_context(|| format!("{} holds an unusable certificate", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if certificates.is_empty() {
        anyhow::bail!("{} holds no PEM CERTIFICATE block", path.display());
    }
    Ok(certificates)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' && index + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).ok();
            if let Some(value) = hex.and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                out.push(value);
                index += 3;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One email ready to send.
#[derive(Debug, Clone)]
pub struct OutgoingEmail {
    pub message_id: String,
    pub to: String,
    pub subject: String,
    pub text_body: String,
    pub html_body: Option<String>,
    /// Extra headers as name → value (for example List-Unsubscribe).
    pub headers: Vec<(String, String)>,
}

/// Why a send failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    pub message: String,
    pub permanent: bool,
}

impl SendError {
    fn permanent(message: impl Into<String>) -> SendError {
        SendError {
            message: message.into(),
            permanent: true,
        }
    }
}

#[derive(Clone)]
pub enum Mailer {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Mailbox {
        transport: AsyncFileTransport<Tokio1Executor>,
        dir: PathBuf,
    },
}

impl Mailer {
    /// Builds the mailer the configuration asks for; without SMTP, the mailbox folder. TLS trusts
    /// the public roots and, when given, the CA certificates in the PEM file `smtp_ca_cert`.
    pub fn from_config(
        smtp_url: Option<&str>,
        smtp_ca_cert: Option<&Path>,
        mailbox_dir: PathBuf,
    ) -> anyhow::Result<Mailer> {
        let Some(url) = smtp_url else {
            std::fs::create_dir_all(&mailbox_dir)?;
            return Ok(Mailer::Mailbox {
                transport: AsyncFileTransport::new(&mailbox_dir),
                dir: mailbox_dir,
            });
        };
        let settings = parse_smtp_url(url)?;
        let extra_roots = match smtp_ca_cert {
            Some(path) => read_ca_certificates(path).context("CDP_SMTP_CA_CERT")?,
            None => Vec::new(),
        };
        let tls = |host: &str| {
            extra_roots
                .into_iter()
                .fold(TlsParameters::builder(host.to_owned()), |builder, root| {
                    builder.add_root_certificate(root)
                })
                .build()
        };
        let mut builder =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(settings.host.clone())
                .port(settings.port)
                .timeout(Some(Duration::from_secs(30)));
        builder = match settings.security {
            SmtpSecurity::None => builder.tls(Tls::None),
            SmtpSecurity::StartTlsWhenOffered => {
                builder.tls(Tls::Opportunistic(tls(&settings.host)?))
            }
            SmtpSecurity::StartTlsRequired => builder.tls(Tls::Required(tls(&settings.host)?)),
            SmtpSecurity::Tls => builder.tls(Tls::Wrapper(tls(&settings.host)?)),
        };
        if let (Some(user), Some(pass)) = (settings.username, settings.password) {
            builder = builder.credentials(Credentials::new(user, pass));
        }
        Ok(Mailer::Smtp(builder.build()))
    }

    /// Says where mail goes, for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            Mailer::Smtp(_) => "SMTP".to_owned(),
            Mailer::Mailbox { dir, .. } => format!("the mailbox folder {}", dir.display()),
        }
    }

    pub async fn send(&self, from: &str, email: &OutgoingEmail) -> Result<(), SendError> {
        let message = build_message(from, email)?;
        match self {
            Mailer::Smtp(transport) => {
                transport
                    .send(message)
                    .await
                    .map(|_| ())
                    .map_err(|error| SendError {
                        permanent: error.is_permanent(),
                        message: format!("SMTP: {error}"),
                    })
            }
            Mailer::Mailbox { transport, .. } => {
                transport
                    .send(message)
                    .await
                    .map(|_| ())
                    .map_err(|error| SendError {
                        permanent: false,
                        message: format!("mailbox: {error}"),
                    })
            }
        }
    }
}

fn build_message(from: &str, email: &OutgoingEmail) -> Result<Message, SendError> {
    let from: Mailbox = from
        .parse()
        .map_err(|error| SendError::permanent(format!("invalid sender {from:?}: {error}")))?;
    let to: Mailbox = email
        .to
        .parse()
        .map_err(|error| SendError::permanent(format!("invalid recipient: {error}")))?;
    if email.subject.contains(['\r', '\n']) {
        return Err(SendError::permanent("the subject contains a line break"));
    }
    let mut builder = Message::builder()
        .from(from)
        .to(to)
        .subject(email.subject.clone())
        .message_id(Some(email.message_id.clone()));
    for (name, value) in &email.headers {
        if value.contains(['\r', '\n']) {
            return Err(SendError::permanent(format!(
                "header {name} contains a line break"
            )));
        }
        let name = HeaderName::new_from_ascii(name.clone())
            .map_err(|_| SendError::permanent(format!("invalid header name {name:?}")))?;
        builder = builder.raw_header(HeaderValue::new(name, value.clone()));
    }
    let message = match &email.html_body {
        Some(html) => builder.multipart(MultiPart::alternative_plain_html(
            email.text_body.clone(),
            html.clone(),
        )),
        None => builder.singlepart(SinglePart::plain(email.text_body.clone())),
    };
    message.map_err(|error| SendError::permanent(format!("cannot build the message: {error}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_url_forms_parse() {
        let plain = parse_smtp_url("smtp://127.0.0.1:2525?tls=none").unwrap();
        assert_eq!(
            (plain.host.as_str(), plain.port, plain.security),
            ("127.0.0.1", 2525, SmtpSecurity::None)
        );
        let starttls = parse_smtp_url("smtp://user:p%40ss@mail.example.com:587").unwrap();
        assert_eq!(starttls.security, SmtpSecurity::StartTlsWhenOffered);
        assert_eq!(starttls.username.as_deref(), Some("user"));
        assert_eq!(starttls.password.as_deref(), Some("p@ss"));
        let tls = parse_smtp_url("smtps://user:pass@mail.example.com").unwrap();
        assert_eq!((tls.port, tls.security), (465, SmtpSecurity::Tls));
        assert!(parse_smtp_url("http://example.com").is_err());
        assert!(parse_smtp_url("smtp://:25").is_err());
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let error = format!("{:#}", read_ca_certificates(&path).unwrap_err());
        assert!(error.contains("no PEM CERTIFICATE"), "{error}");
        let error = format!(
            "{:#}",
            Mailer::from_config(Some("smtp://127.0.0.1:25"), Some(&path), dir.path().into())
                .err()
                .unwrap()
        );
        assert!(error.starts_with("CDP_SMTP_CA_CERT:"), "{error}");
    }

    #[test]
    fn header_injection_is_refused() {
        let email = OutgoingEmail {
            message_id: "<1@x>".to_owned(),
            to: "a@example.com\r\nBcc: b@example.com".to_owned(),
            subject: "hi".to_owned(),
            text_body: "body".to_owned(),
            html_body: None,
            headers: vec![],
        };
        assert!(
            build_message("CDP <no-reply@example.com>", &email)
                .unwrap_err()
                .permanent
        );
        let email = OutgoingEmail {
            to: "a@example.com".to_owned(),
            subject: "hi\r\nBcc: b@example.com".to_owned(),
            ..email
        };
        assert!(build_message("CDP <no-reply@example.com>", &email).is_err());
    }
}
