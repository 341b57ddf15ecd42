//! `drover serve`: the engine with its listeners, and graceful shutdown.

use crate::api::{router, AppState};
use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::listener::{ListenerError, SmtpListener};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The process-wide Prometheus recorder (the `metrics` facade allows one).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = with_buckets().unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; then this handle renders nothing,
            // which tests that run several engines in one process accept.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The recorder's builder with the buckets of every histogram (without, the exporter renders
/// a summary).
fn with_buckets() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    use metrics_exporter_prometheus::Matcher;
    let mut builder = PrometheusBuilder::new().set_buckets_for_metric(
        Matcher::Full(crate::telemetry::DELIVERY_DURATION.into()),
        crate::telemetry::DELIVERY_DURATION_BUCKETS,
    )?;
    for name in [
        queue::WRITE_HISTOGRAM,
        queue::FSYNC_HISTOGRAM,
        crate::telemetry::INJECTION_DURATION,
    ] {
        builder = builder.set_buckets_for_metric(
            Matcher::Full(name.into()),
            crate::telemetry::STORAGE_BUCKETS,
        )?;
    }
    Ok(builder)
}

/// A running engine with its HTTP and SMTP listeners.
pub struct Running {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Where the HTTP API listens (useful with port 0).
    pub http_addr: SocketAddr,
    /// Where the SMTP injection listener listens (useful with port 0).
    pub smtp_addr: Option<SocketAddr>,
    /// Where the one-click unsubscribe listener listens, when `[unsubscribe] listen` is set.
    pub unsubscribe_addr: Option<SocketAddr>,
    smtp: Option<SmtpListener>,
    leaving: Arc<AtomicBool>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The engine did not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The SMTP listener could not be set up (e.g. its TLS certificate).
    #[error("SMTP listener: {0}")]
    Listener(String),
}

impl From<ListenerError> for ServeError {
    fn from(e: ListenerError) -> ServeError {
        match e {
            ListenerError::Bind { addr, source } => ServeError::Bind { addr, source },
            ListenerError::Tls(why) | ListenerError::Password(why) => ServeError::Listener(why),
        }
    }
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Starts the engine and its listeners.
pub async fn start(config: Config) -> Result<Running, ServeError> {
    let handle = metrics_handle();
    let listen = config.http.listen;
    let engine = Engine::start(config).await?;
    // Bound before the HTTP server runs, so /readyz says ready only once SMTP is accepted too.
    let smtp = SmtpListener::start(Arc::clone(&engine)).await?;
    let smtp_addr = smtp.local_addr();
    let listener = smtp_server::bind(listen).map_err(|source| ServeError::Bind {
        addr: listen,
        source,
    })?;
    let http_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: listen,
        source,
    })?;
    let stop = CancellationToken::new();
    // Histograms keep every sample until they are drained: by a scrape, or by this upkeep,
    // so an engine nobody scrapes does not grow by a sample per attempt.
    let upkeep = handle.clone();
    let upkeep_stop = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = upkeep_stop.cancelled() => return,
                _ = tokio::time::sleep(METRICS_UPKEEP) => upkeep.run_upkeep(),
            }
        }
    });
    let leaving = Arc::new(AtomicBool::new(false));
    let app = router(AppState {
        engine: Arc::clone(&engine),
        metrics: handle,
        leaving: Arc::clone(&leaving),
    });
    let stopped = stop.clone();
    let server = tokio::spawn(async move {
        // The client's address goes into the Received header of what it injects.
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            stopped.cancelled().await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    // The one-click door faces the internet: its own listener, its own router, nothing else
    // on it. It closes with the API.
    let unsubscribe_addr = match engine.config().unsubscribe.listen {
        None => None,
        Some(addr) => {
            let listener =
                smtp_server::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| ServeError::Bind { addr, source })?;
            let app = crate::unsubscribe_http::router(Arc::clone(&engine));
            let stopped = stop.clone();
            tokio::spawn(async move {
                let serve = axum::serve(listener, app)
                    .with_graceful_shutdown(async move { stopped.cancelled().await });
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "unsubscribe server failed");
                }
            });
            tracing::info!(%bound, "serving one-click unsubscribe");
            Some(bound)
        }
    };
    tracing::info!(%http_addr, %smtp_addr, "drover is serving");
    Ok(Running {
        engine,
        http_addr,
        smtp_addr: Some(smtp_addr),
        unsubscribe_addr,
        smtp: Some(smtp),
        leaving,
        stop,
        server,
    })
}

impl Running {
    /// Graceful stop: refuse new work, finish in-flight deliveries (up to `grace`), flush.
    /// `/readyz` answers 503 first, for `http.shutdown_grace` while injection is still
    /// accepted, so a load balancer (a Kubernetes Service) takes the instance out before
    /// clients are refused. The HTTP listener closes last, so `/readyz` keeps answering 503
    /// (not a refused connection) while the engine drains.
    pub async fn shutdown(self, grace: Duration) {
        self.leaving.store(true, Ordering::SeqCst);
        let notice = self.engine.config().http.shutdown_grace.0;
        if !notice.is_zero() {
            tracing::info!(
                ?notice,
                "not ready; still accepting until the shutdown grace ends"
            );
            tokio::time::sleep(notice).await;
        }
        self.engine.begin_drain();
        if let Some(smtp) = &self.smtp {
            smtp.stop_accepting();
        }
        self.engine.shutdown(grace).await;
        self.stop.cancel();
        let _ = self.server.await;
        // The engine refuses messages now, so a transaction still open gets 421, not a 250
        // for a message the closed spool would lose.
        if let Some(smtp) = self.smtp {
            smtp.close().await;
        }
    }
}
