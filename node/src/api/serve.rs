//! HTTPS serving of an axum router with rustls.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` over TLS on `listener` until `shutdown` turns true. Each connection's handshake
/// runs in its own task, so a slow client never blocks accepting others.
pub async fn serve_https(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_https_and_amqp(listener, tls, router, None, shutdown).await
}

/// Like [`serve_https`]; with `amqp`, a connection whose first bytes are an AMQP protocol header
/// is served as AMQP (SDKs that take the AMQP port from `HostName=host:port` connect here).
pub async fn serve_https_and_amqp(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    amqp: Option<Arc<crate::amqp::AmqpContext>>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let mut conn_shutdown = shutdown.clone();
        let amqp = amqp.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "tls handshake timed out");
                    return;
                }
            };
            // Every HTTP request starts with at least 4 bytes (a method or the HTTP/2 preface).
            let mut tls = tls;
            let mut first = [0u8; 4];
            if amqp.is_some() && tls.read_exact(&mut first).await.is_err() {
                return;
            }
            let read = if amqp.is_some() {
                first.to_vec()
            } else {
                Vec::new()
            };
            if let Some(ctx) = amqp.filter(|_| &first == b"AMQP") {
                tokio::select! {
                    _ = crate::amqp::serve_connection(ctx, tls, read, peer) => {}
                    _ = conn_shutdown.changed() => {}
                }
                return;
            }
            let stream = crate::amqp::Replay::new(read, tls);
            let builder = Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                res = conn.as_mut() => {
                    if let Err(e) = res {
                        tracing::debug!(%peer, error = %e, "connection ended with error");
                    }
                }
                _ = conn_shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
}
