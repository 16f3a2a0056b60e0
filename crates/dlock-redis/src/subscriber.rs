//! One pub/sub connection per backend, shared by every waiter, which
//! resubscribes after a reconnect. It listens on the backend's own channel,
//! where a release that hands the lock to one of this backend's waiters
//! names that waiter's owner token, and (for Redlock nodes, whose waiters
//! do not stand in line) on a key's release channel while someone waits on
//! that key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;

use dlock_core::backend::Backoff;
use dlock_core::{LockError, ReleaseEvents, ReleaseHub};
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{Mutex, mpsc};
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, warn};

use crate::connection::PubSubSource;
use crate::errors::from_redis;
use crate::scripts::HAND_OVER_V2;

pub(crate) struct Subscriber {
    source: PubSubSource,
    hub: ReleaseHub,
    /// The open pub/sub connection's writing half, if any, and which
    /// connection it is.
    connection: Mutex<Connection>,
    timeout: Duration,
    /// The backend's own channel, subscribed from the first wait in a line
    /// on for as long as the backend lives.
    own_channel: String,
    own_subscription: tokio::sync::OnceCell<ReleaseEvents>,
    /// Whether a pub/sub connection is open and read; changed only with
    /// `connection` locked, so that it always says what that holds.
    connected: AtomicBool,
    /// This backend's waiters in a line, by owner token.
    in_line: std::sync::Mutex<HashMap<String, InLine>>,
}

/// The pub/sub connection. Each one opened gets the next generation; the
/// task that reads a connection knows its generation, so that once a newer
/// connection replaced its own it changes nothing.
#[derive(Default)]
struct Connection {
    sink: Option<PubSubSink>,
    generation: u64,
}

impl Subscriber {
    /// Forgets the open connection (it broke); hand-overs do not reach this
    /// backend until the next one is opened.
    fn disconnected(&self, connection: &mut Connection) {
        connection.sink = None;
        self.connected.store(false, Ordering::Release);
    }

    /// The stream of connection `generation` ended. Forgets that connection
    /// if it is still the open one and returns true; returns false, changing
    /// nothing, once a newer connection replaced it.
    async fn connection_ended(&self, generation: u64) -> bool {
        let mut connection = self.connection.lock().await;
        if connection.generation != generation {
            return false;
        }
        self.disconnected(&mut connection);
        true
    }
}

/// What this backend knows of one of its waiters in a line.
struct InLine {
    /// Wakes the waiter's current attempt; each attempt replaces it.
    wake: mpsc::Sender<()>,
    /// The number of the waiter's latest attempt.
    attempts: u64,
    /// The latest attempt that found the lock busy: its number, and when
    /// it began.
    busy: Option<(u64, Instant)>,
    /// A hand-over announced for this waiter.
    handed: Option<Announced>,
}

/// A hand-over message for one waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Announced {
    token: u64,
    /// The waiter's last attempt the server had seen before it.
    attempt: u64,
    /// The lease the server set.
    reservation: Duration,
}

impl InLine {
    /// Events for the waiter's current attempt; those of the previous one
    /// no longer fire.
    fn new_events(&mut self) -> ReleaseEvents {
        let (wake, events) = mpsc::channel(1);
        self.wake = wake;
        ReleaseEvents::from_channel(events)
    }
}

/// A hand-over this backend was told of: the waiter's fencing token, since
/// when its lease certainly runs, and for how long the server set it.
pub(crate) struct HandOver {
    pub(crate) token: u64,
    pub(crate) since: Instant,
    pub(crate) reservation: Duration,
}

impl Subscriber {
    /// A subscriber that connects on first use.
    pub(crate) fn new(source: PubSubSource, timeout: Duration, own_channel: String) -> Arc<Self> {
        let (idle_tx, idle_rx) = mpsc::unbounded_channel::<String>();
        let hub = ReleaseHub::with_idle_hook(move |channel| {
            // The receiver lives as long as the subscriber; if it is gone,
            // so is the connection and its subscriptions.
            let _ = idle_tx.send(channel.to_owned());
        });
        let subscriber = Arc::new(Subscriber {
            source,
            hub,
            connection: Mutex::default(),
            timeout,
            own_channel,
            own_subscription: tokio::sync::OnceCell::new(),
            connected: AtomicBool::new(false),
            in_line: std::sync::Mutex::default(),
        });
        tokio::spawn(unsubscribe_idle(Arc::downgrade(&subscriber), idle_rx));
        subscriber
    }

    /// Wakes local waiters on `channel` at once (our own release).
    #[cfg(feature = "redlock")]
    pub(crate) fn notify_local(&self, channel: &str) {
        self.hub.notify(channel);
    }

    /// The channel on which releases hand locks to this backend's waiters.
    pub(crate) fn own_channel(&self) -> &str {
        &self.own_channel
    }

    /// Whether hand-overs reach this backend now: the own channel is
    /// subscribed (it stays so once it is) on an open connection.
    pub(crate) fn listens_on_own_channel(&self) -> bool {
        self.own_subscription.initialized() && self.connected.load(Ordering::Acquire)
    }

    /// Subscribes to the own channel, or opens the connection again, if
    /// hand-overs do not reach this backend now; returns once the server
    /// confirmed.
    pub(crate) async fn listen_on_own_channel(self: &Arc<Self>, key: &str) -> Result<(), LockError> {
        if !self.own_subscription.initialized() {
            return self
                .own_subscription
                .get_or_try_init(|| self.subscribe(key, self.own_channel()))
                .await
                .map(drop);
        }
        let mut connection = self.connection.lock().await;
        if connection.sink.is_none() {
            let stream = self
                .reconnect(&mut connection)
                .await
                .map_err(|error| self.subscribe_failed(key, error))?;
            tokio::spawn(read_messages(Arc::downgrade(self), stream, connection.generation));
        }
        Ok(())
    }

    fn subscribe_failed(&self, key: &str, error: Option<redis::RedisError>) -> LockError {
        match error {
            Some(error) => from_redis(Some(key), "subscribing to release notifications", error),
            None => LockError::unavailable(
                Some(key),
                format!(
                    "subscribing to release notifications took over {:?}",
                    self.timeout
                ),
            ),
        }
    }

    /// True when nobody waits: no waiter in a line, and no subscription
    /// but the own channel's.
    fn nobody_waits(&self) -> bool {
        self.lines().is_empty() && self.hub.len() <= usize::from(self.own_subscription.initialized())
    }

    /// Records that `owner` waits in a line (if it is not recorded yet).
    pub(crate) fn join_line(&self, owner: &str) {
        self.lines().entry(owner.to_owned()).or_insert_with(|| InLine {
            wake: mpsc::channel(1).0,
            attempts: 0,
            busy: None,
            handed: None,
        });
    }

    /// Whether `owner` waits in a line, as far as this client knows.
    pub(crate) fn is_in_line(&self, owner: &str) -> bool {
        self.lines().contains_key(owner)
    }

    /// Starts `owner`'s next attempt: its number, and the events that fire
    /// when a release hands the lock to `owner` (or a reconnect may have
    /// lost such a message). `None` when `owner` is not in a line.
    pub(crate) fn begin_attempt(&self, owner: &str) -> Option<(u64, ReleaseEvents)> {
        let mut lines = self.lines();
        let waiter = lines.get_mut(owner)?;
        waiter.attempts += 1;
        Some((waiter.attempts, waiter.new_events()))
    }

    /// New events for `owner` without a new attempt.
    pub(crate) fn events(&self, owner: &str) -> Option<ReleaseEvents> {
        self.lines().get_mut(owner).map(InLine::new_events)
    }

    /// `owner`'s attempt number `attempt`, begun at `began`, found the lock
    /// busy.
    pub(crate) fn found_busy(&self, owner: &str, attempt: u64, began: Instant) {
        if let Some(waiter) = self.lines().get_mut(owner) {
            // A waiter's attempts run one after the other: this is the latest.
            waiter.busy = Some((attempt, began));
        }
    }

    /// The hand-over announced for `owner`, if it followed `owner`'s latest
    /// busy attempt: the server handed the lock over after it saw that
    /// attempt, so the lease runs at least from when the attempt began.
    /// An older announcement (its reservation ran out unclaimed, or the
    /// attempt after it found the lock busy) is dropped.
    pub(crate) fn take_hand_over(&self, owner: &str) -> Option<HandOver> {
        let mut lines = self.lines();
        let waiter = lines.get_mut(owner)?;
        let announced = waiter.handed.take()?;
        let (busy, since) = waiter.busy?;
        (announced.attempt == busy).then_some(HandOver {
            token: announced.token,
            since,
            reservation: announced.reservation,
        })
    }

    /// `owner` left its line (it got the lock, or gave up).
    pub(crate) fn leave_line(&self, owner: &str) {
        self.lines().remove(owner);
    }

    /// A release handed a lock over (`message` as published, see
    /// [`parse_hand_over`]): records it and wakes the waiter, if it waits
    /// here. A message without the lease the server set (from an older
    /// client) only wakes the waiter, whose next attempt reads the lock.
    pub(crate) fn handed_over(&self, message: &[u8]) {
        let Some((owner, announced)) = parse_hand_over(message) else {
            return;
        };
        if let Some(waiter) = self.lines().get_mut(owner) {
            waiter.handed = announced;
            // Full: a wake-up is pending already. Closed: the attempt is
            // over, and the next one reads the lock anyway.
            let _ = waiter.wake.try_send(());
        }
    }

    fn wake_everyone(&self) {
        self.hub.notify_all();
        for waiter in self.lines().values() {
            let _ = waiter.wake.try_send(());
        }
    }

    fn lines(&self) -> std::sync::MutexGuard<'_, HashMap<String, InLine>> {
        // Every update is a single insert, replace or remove.
        self.in_line.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts listening on `channel`; returns once the server confirmed.
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        key: &str,
        channel: &str,
    ) -> Result<ReleaseEvents, LockError> {
        let subscription = self.hub.subscribe(channel);
        if !subscription.first {
            return Ok(subscription.events);
        }
        let mut connection = self.connection.lock().await;
        if let Some(live) = connection.sink.as_mut() {
            match timeout(self.timeout, live.subscribe(channel)).await {
                Ok(Ok(())) => return Ok(subscription.events),
                // The connection is broken: open a new one below.
                Ok(Err(_)) | Err(_) => self.disconnected(&mut connection),
            }
        }
        let stream = self
            .reconnect(&mut connection)
            .await
            .map_err(|error| self.subscribe_failed(key, error))?;
        tokio::spawn(read_messages(Arc::downgrade(self), stream, connection.generation));
        Ok(subscription.events)
    }

    /// Opens a pub/sub connection, subscribes to every channel someone waits
    /// on, and returns the message stream to read (the connection's
    /// generation is then `connection.generation`). `None` as error: a
    /// timeout.
    async fn reconnect(
        &self,
        connection: &mut Connection,
    ) -> Result<PubSubStream, Option<redis::RedisError>> {
        let opened = timeout(self.timeout, async {
            let (mut new_sink, stream) = self.source.open().await?.split();
            let channels = self.hub.keys_with_subscribers();
            if !channels.is_empty() {
                new_sink.subscribe(&channels).await?;
            }
            Ok::<_, redis::RedisError>((new_sink, stream))
        })
        .await;
        let (new_sink, stream) = match opened {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return Err(Some(error)),
            Err(_) => return Err(None),
        };
        connection.sink = Some(new_sink);
        connection.generation += 1;
        self.connected.store(true, Ordering::Release);
        // Releases may have been missed while no connection listened.
        self.wake_everyone();
        Ok(stream)
    }
}

/// The waiter a hand-over message names, and what it announces: `v2
/// owner token attempt px` in full; an older client's `owner token attempt`
/// names the waiter but not the lease the server set, so it announces
/// nothing a waiter may count on.
fn parse_hand_over(message: &[u8]) -> Option<(&str, Option<Announced>)> {
    let message = std::str::from_utf8(message).ok()?;
    let parts: Vec<&str> = message.split(' ').collect();
    match parts.as_slice() {
        [version, owner, token, attempt, px] if *version == HAND_OVER_V2 => {
            let announced = Announced {
                token: token.parse().ok()?,
                attempt: attempt.parse().ok()?,
                reservation: Duration::from_millis(px.parse().ok()?),
            };
            Some((owner, Some(announced)))
        }
        [owner, _token, _attempt] => Some((owner, None)),
        _ => None,
    }
}

/// Reads release messages from connection `generation`. After a disconnect
/// it reconnects while anyone waits (waiters fall back to their TTL hints
/// meanwhile), unless a newer connection was opened already: then it ends
/// and changes nothing.
async fn read_messages(subscriber: Weak<Subscriber>, mut stream: PubSubStream, mut generation: u64) {
    'connection: loop {
        while let Some(message) = stream.next().await {
            let Some(subscriber) = subscriber.upgrade() else {
                return;
            };
            if message.get_channel_name() == subscriber.own_channel {
                subscriber.handed_over(message.get_payload_bytes());
            } else {
                subscriber.hub.notify(message.get_channel_name());
            }
        }
        let Some(live) = subscriber.upgrade() else { return };
        if !live.connection_ended(generation).await {
            return; // a newer connection is read by its own task
        }
        live.wake_everyone();
        warn!("the pub/sub connection closed; reconnecting");
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            if live.nobody_waits() {
                debug!("nobody waits; the pub/sub connection stays closed until needed");
                return;
            }
            {
                let mut connection = live.connection.lock().await;
                if connection.generation != generation {
                    return; // a subscriber reconnected first and reads the new connection
                }
                if let Ok(new_stream) = live.reconnect(&mut connection).await {
                    debug!("pub/sub reconnected");
                    stream = new_stream;
                    generation = connection.generation;
                    continue 'connection;
                }
            }
            sleep(backoff.next_delay()).await;
        }
    }
}

/// Unsubscribes from channels nobody waits on any more.
async fn unsubscribe_idle(subscriber: Weak<Subscriber>, mut idle: mpsc::UnboundedReceiver<String>) {
    while let Some(channel) = idle.recv().await {
        let Some(subscriber) = subscriber.upgrade() else {
            return;
        };
        let mut connection = subscriber.connection.lock().await;
        // A new waiter may have subscribed again meanwhile.
        if subscriber.hub.keys_with_subscribers().contains(&channel) {
            continue;
        }
        if let Some(live) = connection.sink.as_mut() {
            // Bounded: every subscribe waits for this lock.
            match timeout(subscriber.timeout, live.unsubscribe(&channel)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => debug!(%error, "unsubscribe failed; the reconnect will drop the channel"),
                Err(_) => {
                    debug!("unsubscribe got no answer; the next subscribe opens a new connection");
                    subscriber.disconnected(&mut connection);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 15, item 6: the reader of a connection that was replaced
    /// learns that its stream ended only after the new connection is open
    /// (the interleaving a pub/sub cut during a reconnect produces). It must
    /// leave the new connection listed as open, or every waiter falls back
    /// to re-sending its script once per round trip.
    #[tokio::test]
    async fn the_reader_of_a_replaced_connection_changes_nothing() {
        let client = redis::Client::open("redis://127.0.0.1:1").expect("a valid URL");
        let subscriber = Subscriber::new(
            PubSubSource::nodes(vec![client]),
            Duration::from_secs(1),
            "own".to_owned(),
        );
        {
            // Connection 1's reader still runs; connection 2 replaced it.
            let mut connection = subscriber.connection.lock().await;
            connection.generation = 2;
            subscriber.connected.store(true, Ordering::Release);
        }
        assert!(!subscriber.connection_ended(1).await, "a stale reader is told so");
        assert!(
            subscriber.connected.load(Ordering::Acquire),
            "a stale reader must not mark the open connection closed"
        );
        assert!(subscriber.connection_ended(2).await);
        assert!(!subscriber.connected.load(Ordering::Acquire));
    }

    #[test]
    fn hand_over_messages_are_read_by_version() {
        let (owner, announced) = parse_hand_over(b"v2 abc 7 3 300").expect("a v2 message");
        assert_eq!(owner, "abc");
        assert_eq!(
            announced,
            Some(Announced {
                token: 7,
                attempt: 3,
                reservation: Duration::from_millis(300)
            })
        );
        // An older client's message wakes the waiter but announces no lease.
        assert_eq!(parse_hand_over(b"abc 7 3"), Some(("abc", None)));
        assert_eq!(parse_hand_over(b"v2 abc 7 3"), None);
        assert_eq!(parse_hand_over(b"v2 abc x 3 300"), None);
    }
}
