//! A TCP proxy on loopback to put between a client and a server, and make
//! the link slow, dead or broken on command.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Which way a fault applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server: requests.
    ToServer,
    /// Server to client: replies and pushed messages.
    ToClient,
    /// Both ways.
    Both,
}

impl Direction {
    fn covers(self, way: Way) -> bool {
        match self {
            Direction::Both => true,
            Direction::ToServer => way == Way::ToServer,
            Direction::ToClient => way == Way::ToClient,
        }
    }
}

/// One pump's direction (never `Both`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    ToServer,
    ToClient,
}

impl Way {
    fn index(self) -> usize {
        match self {
            Way::ToServer => 0,
            Way::ToClient => 1,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Faults {
    latency: [Duration; 2],
    blackhole: [bool; 2],
    refuse_new: bool,
    /// How long a new connection waits before it reaches the server.
    connect_delay: Duration,
    /// Counts `cut` commands; a change closes every open connection.
    cuts: u64,
}

/// Faults that strike once: the first connection to meet one claims it.
#[derive(Debug, Default)]
struct OneShots {
    /// The next chunk toward a client is replaced by bytes no protocol accepts.
    corrupt_next_reply: AtomicBool,
    /// The next chunk toward a client is cut in half and the connection closed.
    break_next_reply: AtomicBool,
}

/// A loopback TCP proxy to one upstream address with injectable faults, per
/// direction: latency on every chunk, a blackhole (bytes are held back, as
/// on a partitioned network, and flow again when it ends), cutting every
/// open connection, refusing new ones, a reply replaced by garbage, and a
/// connection closed in the middle of a reply.
///
/// Dropping the proxy stops it and closes its connections.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use std::time::Duration;
/// use dlock_testkit::{Direction, FaultProxy};
///
/// let proxy = FaultProxy::start("127.0.0.1:6379".parse().unwrap()).await?;
/// let url = format!("redis://{}", proxy.address()); // give this to the client
/// proxy.set_latency(Duration::from_millis(500)); // every chunk now takes 0.5 s longer
/// proxy.set_blackhole_toward(Direction::ToClient, true); // replies stop arriving
/// # let _ = url;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    address: SocketAddr,
    faults: watch::Sender<Faults>,
    one_shots: Arc<OneShots>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (faults, watching) = watch::channel(Faults::default());
        let one_shots = Arc::new(OneShots::default());
        tokio::spawn(accept(listener, upstream, watching, Arc::clone(&one_shots)));
        Ok(FaultProxy {
            address,
            faults,
            one_shots,
        })
    }

    /// The address clients connect to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Delays every chunk of bytes, in both directions, by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.set_latency_toward(Direction::Both, latency);
    }

    /// Delays every chunk of bytes going `direction` by `latency`.
    pub fn set_latency_toward(&self, direction: Direction, latency: Duration) {
        self.for_ways(direction, |faults, way| faults.latency[way.index()] = latency);
    }

    /// Holds back every byte in both directions while on; connections stay
    /// open and the bytes flow again when it ends, as after a partition.
    pub fn set_blackhole(&self, on: bool) {
        self.set_blackhole_toward(Direction::Both, on);
    }

    /// Holds back every byte going `direction` while on.
    pub fn set_blackhole_toward(&self, direction: Direction, on: bool) {
        self.for_ways(direction, |faults, way| faults.blackhole[way.index()] = on);
    }

    /// Closes every open connection (new ones are still accepted).
    pub fn cut(&self) {
        self.faults.send_modify(|faults| faults.cuts += 1);
    }

    /// While on, new connections are accepted and closed at once, before
    /// any byte reaches the server.
    pub fn set_refuse_new(&self, on: bool) {
        self.faults.send_modify(|faults| faults.refuse_new = on);
    }

    /// Holds every new connection for `delay` before it reaches the server,
    /// as a slow handshake would (a lost SYN, a TLS handshake over a long
    /// link); its first bytes flow after that. Open connections are not
    /// affected.
    pub fn set_connect_delay(&self, delay: Duration) {
        self.faults.send_modify(|faults| faults.connect_delay = delay);
    }

    /// Replaces the next chunk the server sends to a client with bytes that
    /// no protocol accepts (the request itself reached the server).
    pub fn corrupt_next_reply(&self) {
        self.one_shots.corrupt_next_reply.store(true, Ordering::SeqCst);
    }

    /// Forwards only the first half of the next chunk the server sends to a
    /// client, then closes that connection (the request reached the server).
    pub fn break_next_reply(&self) {
        self.one_shots.break_next_reply.store(true, Ordering::SeqCst);
    }

    fn for_ways(&self, direction: Direction, change: impl Fn(&mut Faults, Way)) {
        self.faults.send_modify(|faults| {
            for way in [Way::ToServer, Way::ToClient] {
                if direction.covers(way) {
                    change(faults, way);
                }
            }
        });
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    one_shots: Arc<OneShots>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                if faults.borrow().refuse_new {
                    drop(client);
                    continue;
                }
                connections.spawn(relay(client, upstream, faults.clone(), Arc::clone(&one_shots)));
            }
            changed = faults.changed() => {
                if changed.is_err() {
                    return; // the proxy was dropped; JoinSet drop aborts the connections
                }
            }
        }
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    faults: watch::Receiver<Faults>,
    one_shots: Arc<OneShots>,
) {
    let delay = faults.borrow().connect_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let cuts = faults.borrow().cuts;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut cut = faults.clone();
    tokio::select! {
        () = pump(client_read, server_write, Way::ToServer, faults.clone(), &one_shots) => {}
        () = pump(server_read, client_write, Way::ToClient, faults, &one_shots) => {}
        _ = cut.wait_for(|faults| faults.cuts != cuts) => {}
    }
}

/// Bytes no Redis, HTTP/2 or gRPC peer accepts as a reply.
const GARBAGE: &[u8] = b"\x00\xffnot a reply\r\n";

async fn pump(
    mut from: impl AsyncReadExt + Unpin,
    mut to: impl AsyncWriteExt + Unpin,
    way: Way,
    mut faults: watch::Receiver<Faults>,
    one_shots: &OneShots,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        // A blackhole holds bytes back by not reading them: the sender's
        // TCP window fills, as on a partitioned link.
        if faults
            .wait_for(|faults| !faults.blackhole[way.index()])
            .await
            .is_err()
        {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        let latency = faults.borrow().latency[way.index()];
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if faults
            .wait_for(|faults| !faults.blackhole[way.index()])
            .await
            .is_err()
        {
            return;
        }
        let mut chunk = &buffer[..read];
        let mut close_after = false;
        if way == Way::ToClient {
            if one_shots.corrupt_next_reply.swap(false, Ordering::SeqCst) {
                chunk = GARBAGE;
            } else if one_shots.break_next_reply.swap(false, Ordering::SeqCst) {
                chunk = &chunk[..chunk.len() / 2];
                close_after = true;
            }
        }
        if to.write_all(chunk).await.is_err() || close_after {
            return;
        }
    }
}
