//! Wiring: opens the store, recovers the hub, starts the group commit, the
//! fan-out and the listeners, and runs the graceful shutdown (ARCHITECTURE.md, "Operations"):
//! stop accepting, stop reading requests, commit and ack everything pending,
//! `GoAway{SHUTDOWN}` to every session, sync, exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::{Config, ConfigError};
use crate::http::App;
use crate::hub::Hub;
use crate::net::tls::{Certificates, TlsSettings};
use crate::pipeline::{self, Completion};
use crate::session::driver::Shutdown;
use crate::store::commit::{self, Durability, Pending, Write};
use crate::store::sled::SledStore;
use crate::store::{Store, StoreError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened or recovered.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A listener could not bind, or the secret could not be read.
    #[error("{0}")]
    Io(String),
}

/// A running server.
pub struct Server {
    /// Bound TCP address.
    pub tcp_addr: SocketAddr,
    /// Bound HTTP address (HTTPS when TLS is configured).
    pub http_addr: SocketAddr,
    /// Bound TLS address, when TLS is configured.
    pub tls_addr: Option<SocketAddr>,
    /// The certificates in force, when TLS is configured.
    certs: Option<Arc<Certificates>>,
    hub: Arc<Hub>,
    app: Arc<App>,
    stop_accepting: CancellationToken,
    shutdown: Shutdown,
    connections: TaskTracker,
    accept_task: tokio::task::JoinHandle<()>,
    tls_task: Option<tokio::task::JoinHandle<()>>,
    commit_task: tokio::task::JoinHandle<()>,
    fanout_task: tokio::task::JoinHandle<()>,
    http_task: tokio::task::JoinHandle<()>,
    housekeeping: tokio::task::JoinHandle<()>,
    /// Where `chatd backup` asks for a backup (the sled store only).
    backup_socket: Option<crate::net::backup::BackupSocket>,
    shutdown_timeout: Duration,
}

impl Server {
    /// Starts with the sled store in `config.data`.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        config.validate()?;
        let secret = match &config.token_secret {
            Some(s) => s.clone(),
            None => crate::auth::load_or_create_secret(&config.data)
                .map_err(|e| StartError::Io(format!("token secret in {}: {e}", config.data.display())))?,
        };
        if let Some((target, options)) = config.cluster() {
            return Self::start_cluster(config, target, options, Auth::new(secret.as_bytes())).await;
        }
        let dir = config.data.join("store");
        let cache = config.cache_mb << 20;
        let store = Arc::new(
            tokio::task::spawn_blocking(move || SledStore::open(&dir, cache))
                .await
                .map_err(|e| StartError::Io(e.to_string()))??,
        );
        let mut server = Self::start_with_store(config, store.clone(), Auth::new(secret.as_bytes())).await?;
        match crate::net::backup::listen(&config.data, store, server.hub.pipeline.commits.clone()) {
            Ok(socket) => server.backup_socket = Some(socket),
            // The server runs without it; `chatd backup` then says that no
            // server answers.
            Err(e) => tracing::error!(
                error = %e,
                dir = %config.data.display(),
                "no backup socket: online backups are off (a Unix socket path must be under 108 bytes)"
            ),
        }
        Ok(server)
    }

    /// Starts a cluster node over the Redis at `target`: its rooms follow
    /// the shared log there, and its own store is the in-memory replica of
    /// the rooms it serves (ARCHITECTURE.md, "Cluster mode").
    async fn start_cluster(
        config: &Config,
        target: crate::store::redis::Target,
        options: crate::store::redis::Options,
        auth: Auth,
    ) -> Result<Server, StartError> {
        use crate::store::redis::{Durability, RedisLog, feed::Feed};
        let durability = options.durability;
        let log = RedisLog::open(&target, options)
            .await
            .map_err(|e| StartError::Config(ConfigError(format!("cluster_redis: {e}"))))?;
        if durability == Durability::Relaxed {
            tracing::warn!(redis = ?target.urls(), "--cluster-durability relaxed: Redis is not required to fsync each append; an acknowledged message may be lost with it");
        }
        let log = Arc::new(log);
        let (deliveries, applied) = mpsc::channel(1024);
        let feed = Feed::start(log.clone(), deliveries);
        let store = Arc::new(crate::store::memory::MemoryStore::new());
        let idle = Duration::from_millis(config.cluster_replica_idle_ms);
        let cluster =
            Arc::new(crate::hub::cluster::Cluster::new(log, feed, store.clone(), config.cluster_presence_ttl_ms, idle));
        Self::start_inner(config, store, auth, Some((cluster, applied))).await
    }

    /// Starts with any store (tests use the in-memory one).
    pub async fn start_with_store(config: &Config, store: Arc<dyn Store>, auth: Auth) -> Result<Server, StartError> {
        Self::start_inner(config, store, auth, None).await
    }

    async fn start_inner(
        config: &Config,
        store: Arc<dyn Store>,
        auth: Auth,
        cluster: Option<(Arc<crate::hub::cluster::Cluster>, mpsc::Receiver<crate::store::redis::feed::Delivery>)>,
    ) -> Result<Server, StartError> {
        config.validate()?;
        // A cluster node's store is its in-memory replica: durability is
        // Redis's (checked when it was opened).
        let durability = if cluster.is_some() { Durability::None } else { config.durability() };
        if config.dev_auth && !config.http.ip().is_loopback() {
            return Err(StartError::Config(ConfigError(format!(
                "dev_auth: the dev login mints tokens for anyone; it is refused unless the HTTP listener is on a loopback address (http = {})",
                config.http
            ))));
        }
        let certs = match (&config.cert, &config.key, config.dev_tls) {
            (Some(cert), Some(key), _) => Some((cert.clone(), key.clone())),
            (_, _, true) => {
                let (cert, key) =
                    crate::net::tls::dev_certificate(&config.data).map_err(|e| StartError::Io(e.to_string()))?;
                tracing::warn!(cert = %cert.display(), "--dev-tls: serving a self-signed certificate for localhost; clients must trust this file (chat --tls --ca FILE)");
                Some((cert, key))
            }
            _ => None,
        };
        let certs = match certs {
            Some((cert, key)) => Some(Arc::new(
                Certificates::load(TlsSettings { cert, key, tls13_only: config.tls13_only })
                    .map_err(|e| StartError::Io(e.to_string()))?,
            )),
            None => None,
        };
        // Before anything registers a metric handle.
        let metrics_handle = crate::metrics::install();
        let st = store.clone();
        let snapshot =
            tokio::task::spawn_blocking(move || st.load()).await.map_err(|e| StartError::Io(e.to_string()))??;
        let (committed_tx, committed_rx) = mpsc::channel(8);
        let (commits, commit_task) =
            commit::start::<Completion>(store.clone(), durability, config.commit_queue, committed_tx);
        let rooms = snapshot.rooms.len();
        let mut hub = Hub::new(config.limits(), store, commits, auth, snapshot);
        let mut applied = None;
        if let Some((c, rx)) = cluster {
            hub = hub.clustered(c);
            applied = Some(rx);
        }
        let hub = Arc::new(hub);
        let fanout_task = tokio::spawn(pipeline::fanout::run(hub.pipeline.clone(), committed_rx));
        let mut rooms = rooms;
        if let Some(rx) = applied {
            rooms = hub
                .cluster_load()
                .await
                .map_err(|e| StartError::Io(format!("cluster_redis: reading the shared state: {e}")))?;
            // Ends with the local commit queue, at shutdown.
            tokio::spawn(crate::hub::cluster::apply(hub.clone(), rx));
            tokio::spawn(crate::hub::cluster::presence_upkeep(Arc::downgrade(&hub)));
            tokio::spawn(crate::hub::cluster::share_presence(Arc::downgrade(&hub)));
            tokio::spawn(crate::hub::cluster::replica_upkeep(Arc::downgrade(&hub)));
        }

        let tls = match config.tls_addr() {
            Some(addr) => Some(crate::net::tcp::listen(addr).map_err(|e| StartError::Io(format!("tls {addr}: {e}")))?),
            None => None,
        };
        let tls_addr = match &tls {
            Some(l) => Some(l.local_addr().map_err(|e| StartError::Io(e.to_string()))?),
            None => None,
        };
        let tcp =
            crate::net::tcp::listen(config.tcp).map_err(|e| StartError::Io(format!("tcp {}: {e}", config.tcp)))?;
        let http =
            crate::net::tcp::listen(config.http).map_err(|e| StartError::Io(format!("http {}: {e}", config.http)))?;
        let tcp_addr = tcp.local_addr().map_err(|e| StartError::Io(e.to_string()))?;
        let http_addr = http.local_addr().map_err(|e| StartError::Io(e.to_string()))?;

        let stop_accepting = CancellationToken::new();
        let shutdown = Shutdown::default();
        let connections = TaskTracker::new();
        let accept_task = tokio::spawn(crate::net::tcp::accept_loop(
            tcp,
            hub.clone(),
            connections.clone(),
            stop_accepting.clone(),
            shutdown.clone(),
        ));
        let app = Arc::new(App {
            hub: hub.clone(),
            serving: false.into(),
            shutdown: shutdown.clone(),
            connections: connections.clone(),
            dev_auth: config.dev_auth,
            web_dir: config.web_dir.clone(),
            metrics: metrics_handle.clone(),
            durability: match hub.cluster() {
                Some(c) => format!("redis-{}", c.log.options().durability),
                None => durability.to_string(),
            },
            admin_token: config.admin_token.clone(),
            certs: certs.clone(),
            api: api_key(config)?
                .map(|key| crate::http::api::Api::new(key, config.api_key_name.clone(), config.api_rate_per_sec)),
        });
        let router = crate::http::router(app.clone());
        let stop = stop_accepting.clone();
        let http_task = match &certs {
            Some(certs) => tokio::spawn(crate::http::serve_https(
                http,
                router,
                certs.clone(),
                stop,
                config.limits().handshake_timeout,
            )),
            None => tokio::spawn(async move {
                let router = router.into_make_service_with_connect_info::<SocketAddr>();
                let serve = axum::serve(http, router).with_graceful_shutdown(async move { stop.cancelled().await });
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "http listener failed");
                }
            }),
        };
        let tls_task = match (tls, &certs) {
            (Some(listener), Some(certs)) => Some(tokio::spawn(crate::net::tls::accept_loop(
                listener,
                hub.clone(),
                certs.clone(),
                connections.clone(),
                stop_accepting.clone(),
                shutdown.clone(),
            ))),
            _ => None,
        };
        let keep = Duration::from_secs(config.idempotency_hours * 3600);
        let (retention, every) = (config.retention(), Duration::from_millis(config.retention_interval_ms));
        if retention != Default::default() {
            tracing::info!(
                max_age_ms = retention.max_age_ms,
                max_messages = retention.max_messages,
                "default retention"
            );
        }
        let housekeeping = tokio::spawn({
            let hub = hub.clone();
            async move {
                tokio::join!(
                    expire_idempotency(hub.clone(), keep),
                    expire_typing(hub.clone()),
                    metrics_upkeep(metrics_handle),
                    crate::hub::retention::run(hub.clone(), retention, every)
                );
            }
        });
        app.serving.store(true, Ordering::Release);
        if config.dev_auth {
            tracing::warn!(%http_addr, "DEV LOGIN IS ON: anyone who can reach {http_addr} can mint a token for any user (--dev-auth); never use this in production");
        }
        let workers = tokio::runtime::Handle::current().metrics().num_workers();
        tracing::info!(%tcp_addr, %http_addr, tls_addr = ?tls_addr, %durability, rooms, workers, "chatd serving");
        Ok(Server {
            tcp_addr,
            http_addr,
            tls_addr,
            certs,
            tls_task,
            hub,
            app,
            stop_accepting,
            shutdown,
            connections,
            accept_task,
            commit_task,
            fanout_task,
            http_task,
            housekeeping,
            backup_socket: None,
            shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
        })
    }

    /// Re-reads the TLS certificate and key (SIGHUP). New connections get
    /// the new certificate; a broken one is refused and the old one stays.
    pub fn reload_tls(&self) -> Result<(), String> {
        match &self.certs {
            Some(c) => c.reload().map_err(|e| e.to_string()),
            None => Err("TLS is not configured".into()),
        }
    }

    /// The shared state (for tests and tools in this crate).
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Graceful shutdown; returns once everything acknowledged is durable
    /// and every connection is closed (or the deadline passed).
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        tracing::info!("shutting down: no new connections or requests");
        self.app.serving.store(false, Ordering::Release);
        self.stop_accepting.cancel();
        if let Some(socket) = self.backup_socket {
            // A backup being streamed is cut short at its next write (its
            // client keeps nothing); the group commit still runs, so one
            // waiting for its point gets there first.
            socket.stop(deadline).await;
        }
        self.shutdown.stop_reading.cancel();
        // Request loops check the token rather than wait on it: wake them.
        crate::session::driver::wake_all_for_shutdown(&self.hub);
        self.shutdown.readers.close();
        if tokio::time::timeout_at(deadline, self.shutdown.readers.wait()).await.is_err() {
            tracing::warn!("some readers did not stop in time");
        }
        // Every write queued before this barrier is committed, fanned out
        // and acked when it comes back.
        let (tx, rx) = oneshot::channel();
        if let Some(slot) = self.hub.pipeline.commits.reserve().await {
            slot.send(Pending {
                write: Write::Barrier,
                completion: Completion::Notify(tx),
                epoch: self.hub.pipeline.commits.epoch(),
            });
            let _ = tokio::time::timeout_at(deadline, rx).await;
        }
        self.shutdown.go_away.cancel();
        self.connections.close();
        if tokio::time::timeout_at(deadline, self.connections.wait()).await.is_err() {
            tracing::warn!("some connections did not close in time");
        }
        self.housekeeping.abort();
        let _ = self.housekeeping.await;
        let _ = self.accept_task.await;
        if let Some(t) = self.tls_task {
            let _ = t.await;
        }
        let _ = self.http_task.await;
        let failed = self.hub.pipeline.commits.has_failed();
        if failed {
            // Everything acknowledged was synced before the failure; a failed
            // store (sled after an I/O error) may never finish another flush.
            tracing::error!("storage has failed: skipping the final sync");
        } else {
            let store = self.hub.store.clone();
            match tokio::time::timeout_at(deadline, tokio::task::spawn_blocking(move || store.sync())).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "final sync failed"),
                Ok(Err(e)) => tracing::error!(error = %e, "final sync task failed"),
                Err(_) => tracing::error!("final sync did not finish before the shutdown deadline"),
            }
        }
        // Nothing is queued any more (readers stopped before the barrier).
        // The commit and fan-out stages hold the hub, and with it the store:
        // wait until they are gone, so the store is closed (and its lock
        // released) when this returns.
        self.fanout_task.abort();
        let _ = self.fanout_task.await;
        self.commit_task.abort();
        let _ = self.commit_task.await;
        drop(self.app);
        if failed {
            // Dropping a failed sled store flushes again and can block
            // forever; the process is exiting, so let the OS reclaim it.
            std::mem::forget(self.hub);
        } else {
            drop(self.hub);
        }
        tracing::info!("shutdown complete");
    }
}

/// Lets the exporter drain its histogram buffers, every five seconds.
async fn metrics_upkeep(handle: metrics_exporter_prometheus::PrometheusHandle) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// Ends typing indicators that were not refreshed, every half second.
async fn expire_typing(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        hub.expire_typing();
    }
}

/// Drops idempotency records past the window, hourly.
async fn expire_idempotency(hub: Arc<Hub>, keep: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let before = crate::time::now_ms().saturating_sub(keep.as_millis() as u64);
        let store = hub.store.clone();
        match tokio::task::spawn_blocking(move || store.expire_idempotency(before)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(expired = n, "idempotency records expired"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "idempotency expiry failed"),
            Err(e) => tracing::warn!(error = %e, "idempotency expiry task failed"),
        }
    }
}

/// The server API's key: `api_key`, or the first line of `api_key_file`.
fn api_key(config: &Config) -> Result<Option<String>, StartError> {
    let Some(path) = &config.api_key_file else { return Ok(config.api_key.clone()) };
    if config.api_key.is_some() {
        return Err(StartError::Config(ConfigError("api_key and api_key_file exclude each other".into())));
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| StartError::Io(format!("api_key_file {}: {e}", path.display())))?;
    let key = text.lines().next().unwrap_or("").trim().to_string();
    if key.len() < 16 {
        return Err(StartError::Config(ConfigError(format!(
            "api_key_file {}: the key must be at least 16 bytes long",
            path.display()
        ))));
    }
    Ok(Some(key))
}
