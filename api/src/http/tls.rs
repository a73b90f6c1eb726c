//! HTTPS (and WSS) on the listener: the certificate chain and private key come from PEM files
//! (`CDP_TLS_CERT`, `CDP_TLS_KEY`) and connections are served with rustls, using the same `ring`
//! provider as every other TLS client in the process (ADR 0009).
//!
//! Guarantees: with TLS on, the port speaks nothing but TLS 1.2 or 1.3, so a plain HTTP request
//! fails; a certificate file, a key file or a pair that does not match is refused at start with a
//! message naming the variable; each handshake runs in its connection's own task within
//! [`HANDSHAKE_TIMEOUT`], so a slow or silent client never holds up the accept loop.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use poem::http::uri::Scheme;
use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

use crate::config::TlsFiles;

/// How long a client may take to complete the TLS handshake after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the PEM files and builds the server configuration: the first certificate of
/// `CDP_TLS_CERT` is the server's, any further ones are the intermediates sent with it;
/// `CDP_TLS_KEY` holds its key as PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = read_certificates(&files.cert).context("CDP_TLS_CERT")?;
    let key = read_private_key(&files.key).context("CDP_TLS_KEY")?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("the TLS provider supports no safe protocol version")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| anyhow!("CDP_TLS_CERT and CDP_TLS_KEY do not fit together: {error}"))?;
    // The server speaks both (hyper detects which); WebSocket upgrades use HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Every certificate of a PEM file; at least one.
fn read_certificates(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| anyhow!("{} is not valid PEM: {error}", path.display()))?;
    if certificates.is_empty() {
        anyhow::bail!("{} holds no PEM CERTIFICATE block", path.display());
    }
    Ok(certificates)
}

fn read_private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| {
        anyhow!(
            "{} holds no usable PEM private key: {error}",
            path.display()
        )
    })
}

/// Wraps an acceptor (the TCP one) so that every connection is served over TLS.
pub struct TlsAcceptor<A> {
    inner: A,
    tls: tokio_rustls::TlsAcceptor,
}

impl<A> TlsAcceptor<A> {
    pub fn new(inner: A, config: Arc<ServerConfig>) -> TlsAcceptor<A> {
        TlsAcceptor {
            inner,
            tls: tokio_rustls::TlsAcceptor::from(config),
        }
    }
}

impl<A> Acceptor for TlsAcceptor<A>
where
    A: Acceptor,
{
    type Io = HandshakeStream<A::Io>;

    fn local_addr(&self) -> Vec<LocalAddr> {
        self.inner.local_addr()
    }

    async fn accept(&mut self) -> io::Result<(Self::Io, LocalAddr, RemoteAddr, Scheme)> {
        let (stream, local_addr, remote_addr, _) = self.inner.accept().await?;
        // The handshake is not awaited here, where it would stall every other client; the
        // connection's task drives it on its first read or write.
        let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(stream));
        let handshake = async move {
            handshake.await.unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the TLS handshake took too long",
                ))
            })
        };
        Ok((
            HandshakeStream {
                state: State::Handshaking(Box::pin(handshake)),
            },
            local_addr,
            remote_addr,
            Scheme::HTTPS,
        ))
    }
}

type Handshake<S> = Pin<Box<dyn Future<Output = io::Result<TlsStream<S>>> + Send>>;

/// A connection that completes its TLS handshake on first use, then reads and writes through it.
pub struct HandshakeStream<S> {
    state: State<S>,
}

enum State<S> {
    Handshaking(Handshake<S>),
    // Boxed: the stream is large, and a connection spends its life in this state anyway.
    Ready(Box<TlsStream<S>>),
    Failed,
}

impl<S> HandshakeStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// Drives the handshake; `Ready(Ok(stream))` once the connection is encrypted.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut TlsStream<S>>> {
        if let State::Handshaking(handshake) = &mut self.state {
            match handshake.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(stream)) => self.state = State::Ready(Box::new(stream)),
                Poll::Ready(Err(error)) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    self.state = State::Failed;
                    return Poll::Ready(Err(error));
                }
            }
        }
        match &mut self.state {
            State::Ready(stream) => Poll::Ready(Ok(stream.as_mut())),
            _ => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS handshake failed",
            ))),
        }
    }
}

impl<S> AsyncRead for HandshakeStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_read(cx, buf),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S> AsyncWrite for HandshakeStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_write(cx, buf),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_flush(cx),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().poll_ready(cx) {
            Poll::Ready(Ok(stream)) => Pin::new(stream).poll_shutdown(cx),
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }
}
