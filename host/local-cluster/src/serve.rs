//! The API server's accept loop, one for plain HTTP and HTTPS alike.
//!
//! Each connection runs in its own task, TLS handshake included, so a slow or silent client
//! never holds up the next `accept`. Connections are served by hyper-util's auto builder (HTTP/1.1
//! and HTTP/2) with upgrades, which exec/attach need for their WebSockets.

use crate::api::VerifiedClientCert;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A client that connects and then says nothing (or stalls mid-handshake) is dropped after this,
/// so idle sockets cannot pile up as tasks.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// kube-apiserver's `ReadHeaderTimeout`: an HTTP/1 client must finish each request's headers
/// within this, and an idle keep-alive connection is closed after it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(32);

/// HTTP/2 pings on quiet connections; a peer that does not answer within the timeout is gone
/// (a half-open connection), and the connection is closed.
const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What kube-apiserver (Go's net/http) answers to plain HTTP on its TLS port, so `curl http://`
/// by mistake says what is wrong instead of failing with a reset.
const PLAIN_HTTP_ON_TLS: &[u8] = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n";

/// The API, once for connections without a client certificate and once marking each request
/// with [`VerifiedClientCert`]; both made at start, so a connection only picks one.
#[derive(Clone)]
pub(crate) struct Apps {
    anonymous: Router,
    certified: Router,
}

impl Apps {
    pub(crate) fn new(app: Router) -> Apps {
        Apps { certified: app.clone().layer(axum::Extension(VerifiedClientCert)), anonymous: app }
    }
}

/// Serve `apps` on `listener` until `cancel`; then stop accepting and let open connections
/// finish their requests. The caller bounds that wait and aborts this task after it, which
/// drops (and so cuts) whatever connection is still open.
pub(crate) async fn serve(listener: TcpListener, apps: Apps, tls: Option<TlsAcceptor>, cancel: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            // Reap finished connections as they end, so the set does not grow with every client.
            Some(done) = connections.join_next(), if !connections.is_empty() => log_panic(done),
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(connection(tcp, peer, apps.clone(), tls.clone(), cancel.clone()));
                }
                Err(e) if is_connection_error(&e) => {}
                Err(e) => {
                    // Out of file descriptors and the like: accepting again at once would spin.
                    tracing::error!(error = %e, "cannot accept a connection; retrying in 1s");
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            },
        }
    }
    // Closing the listener now refuses new clients instead of leaving them hanging in the backlog.
    drop(listener);
    while let Some(done) = connections.join_next().await {
        log_panic(done);
    }
}

fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        tracing::error!(error = %e, "a connection task failed");
    }
}

/// Errors about one client's connection, not the listener (same list as axum::serve).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

async fn connection(tcp: TcpStream, peer: SocketAddr, apps: Apps, tls: Option<TlsAcceptor>, cancel: CancellationToken) {
    // Exec/attach frames and watch events are small writes that should leave at once.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(client.address = %peer, error = %e, "cannot set TCP_NODELAY");
    }
    let Some(acceptor) = tls else {
        return http(tcp, peer, apps.anonymous, cancel).await;
    };
    let handshake = async move {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 1 && first[0] != TLS_HANDSHAKE_RECORD {
            let mut tcp = tcp;
            tcp.write_all(PLAIN_HTTP_ON_TLS).await?;
            tcp.shutdown().await?;
            return Ok(None);
        }
        acceptor.accept(tcp).await.map(Some)
    };
    let stream = tokio::select! {
        () = cancel.cancelled() => return,
        done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match done {
            Ok(Ok(Some(stream))) => stream,
            Ok(Ok(None)) => {
                tracing::debug!(client.address = %peer, "plain HTTP on the TLS port; answered 400");
                return;
            }
            Ok(Err(e)) => {
                tracing::debug!(client.address = %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(client.address = %peer, "TLS handshake timed out");
                return;
            }
        },
    };
    let certified = stream.get_ref().1.peer_certificates().is_some_and(|chain| !chain.is_empty());
    let app = if certified { apps.certified } else { apps.anonymous };
    http(stream, peer, app, cancel).await
}

async fn http<I>(io: I, peer: SocketAddr, app: Router, cancel: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    // RFC 8441 (WebSockets over HTTP/2), as axum::serve enables it.
    builder
        .http2()
        .enable_connect_protocol()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    let io = FirstBytes::new(io);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(app));
    let mut conn = std::pin::pin!(conn);
    let served = tokio::select! {
        served = conn.as_mut() => served,
        () = cancel.cancelled() => {
            // Finish the request in flight, then close; the caller bounds how long that may take.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = served {
        // A client hanging up or speaking nonsense is its own business, not a server failure.
        tracing::debug!(client.address = %peer, error = %e, "connection ended with an error");
    }
}

/// Bytes that tell HTTP/1 from HTTP/2 (the length of the HTTP/2 preface): the auto builder reads
/// that much before any protocol timeout applies.
const VERSION_SNIFF_BYTES: usize = 24;

/// A connection that must deliver its first `VERSION_SNIFF_BYTES` within `HANDSHAKE_TIMEOUT`.
/// hyper-util's version detection has no deadline of its own, so a client that connects (or
/// finishes its TLS handshake) and then says nothing, or a few bytes, would hold its task forever;
/// after those bytes HTTP/1's header timeout and HTTP/2's pings take over.
struct FirstBytes<I> {
    io: I,
    seen: usize,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<I> FirstBytes<I> {
    fn new(io: I) -> Self {
        FirstBytes { io, seen: 0, deadline: Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT)) }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstBytes<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.seen += buf.filled().len() - before;
                Poll::Ready(r)
            }
            Poll::Pending if this.seen < VERSION_SNIFF_BYTES && this.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client sent no request in time",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstBytes<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
