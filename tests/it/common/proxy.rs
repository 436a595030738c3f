//! A TCP proxy on loopback that a test cuts and restores: one node's link
//! to Redis lost while Redis and the other nodes go on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards every connection to `upstream` until cut.
pub struct Proxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    open: Arc<AtomicBool>,
    /// Bumped by every cut: the piping tasks drop their connections.
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy to `upstream` (`host:port`), open.
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let (cuts, _) = watch::channel(0u64);
        let task = tokio::spawn({
            let (open, cuts) = (open.clone(), cuts.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !open.load(Ordering::Acquire) {
                        // Accepted and dropped at once: a link that does
                        // not work, as a cut network answers.
                        continue;
                    }
                    let mut cut = cuts.subscribe();
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            }
        });
        Proxy { port, open, cuts, task }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Drops every connection through it and refuses new ones.
    pub fn cut(&self) {
        self.open.store(false, Ordering::Release);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.open.store(true, Ordering::Release);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
