//! A TCP proxy on loopback to put between a client and a server, and make
//! the link slow or dead on command.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A loopback TCP proxy to one upstream address with injectable faults:
/// latency on every chunk (both directions), a blackhole (bytes are read
/// and dropped), and cutting every open connection.
///
/// Dropping the proxy stops it and closes its connections.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use std::time::Duration;
/// use dlock_testkit::FaultProxy;
///
/// let proxy = FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await?;
/// let url = format!("redis://{}", proxy.address()); // give this to the client
/// proxy.set_latency(Duration::from_millis(500));  // every reply now takes 0.5 s longer
/// # let _ = url;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    address: SocketAddr,
    faults: Arc<Faults>,
    stop: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Faults {
    latency_micros: AtomicU64,
    blackhole: AtomicBool,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let faults = Arc::new(Faults::default());
        // The value counts "cut" commands; closing the sender stops everything.
        let (stop, cut) = watch::channel(0u64);
        tokio::spawn(accept(listener, upstream, Arc::clone(&faults), cut));
        Ok(FaultProxy {
            address,
            faults,
            stop,
        })
    }

    /// The address clients connect to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Delays every chunk of bytes, in both directions, by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.faults.latency_micros.store(micros, Ordering::Relaxed);
    }

    /// Drops every byte in both directions while on (connections stay open).
    pub fn set_blackhole(&self, on: bool) {
        self.faults.blackhole.store(on, Ordering::Relaxed);
    }

    /// Closes every open connection (new ones are still accepted).
    pub fn cut(&self) {
        self.stop.send_modify(|cuts| *cuts += 1);
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: Arc<Faults>,
    mut cut: watch::Receiver<u64>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let faults = Arc::clone(&faults);
                let mut cut = cut.clone();
                cut.mark_unchanged();
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        () = pump(client_read, server_write, &faults) => {}
                        () = pump(server_read, client_write, &faults) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
            changed = cut.changed() => {
                if changed.is_err() {
                    return; // the proxy was dropped; JoinSet drop aborts the connections
                }
            }
        }
    }
}

async fn pump(mut from: impl AsyncReadExt + Unpin, mut to: impl AsyncWriteExt + Unpin, faults: &Faults) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let latency = faults.latency_micros.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        if faults.blackhole.load(Ordering::Relaxed) {
            continue;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
