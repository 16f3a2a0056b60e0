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

use dlock_core::{LockError, ReleaseEvents, ReleaseHub};
use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{Mutex, mpsc};
use tokio::time::{sleep, timeout};
use tracing::{debug, warn};

use crate::connection::PubSubSource;
use crate::errors::from_redis;

pub(crate) struct Subscriber {
    source: PubSubSource,
    hub: ReleaseHub,
    sink: Mutex<Option<PubSubSink>>,
    timeout: Duration,
    /// The backend's own channel, subscribed from the first wait in a line
    /// on for as long as the backend lives.
    own_channel: String,
    own_subscription: tokio::sync::OnceCell<ReleaseEvents>,
    /// Whether a pub/sub connection is open and read.
    connected: AtomicBool,
    /// How this backend's waiters in a line are woken, by owner token;
    /// each attempt replaces its waiter's sender.
    in_line: std::sync::Mutex<HashMap<String, mpsc::Sender<()>>>,
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
            sink: Mutex::new(None),
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
        let mut sink = self.sink.lock().await;
        if sink.is_none() {
            let stream = self
                .reconnect(&mut sink)
                .await
                .map_err(|error| self.subscribe_failed(key, error))?;
            tokio::spawn(read_messages(Arc::downgrade(self), stream));
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
        self.lines().is_empty()
            && self.hub.len() <= usize::from(self.own_subscription.initialized())
    }

    /// Records that `owner` waits in a line. Its hand-over wakes the events
    /// of its latest [`line_events`](Self::line_events).
    pub(crate) fn join_line(&self, owner: &str) {
        let (wake, _) = mpsc::channel(1);
        self.lines().insert(owner.to_owned(), wake);
    }

    /// Whether `owner` waits in a line, as far as this client knows.
    pub(crate) fn is_in_line(&self, owner: &str) -> bool {
        self.lines().contains_key(owner)
    }

    /// Events that fire when a release hands the lock to `owner` (or a
    /// reconnect may have lost such a message). Replaces the events of the
    /// waiter's previous attempt. `None` when `owner` is not in a line.
    pub(crate) fn line_events(&self, owner: &str) -> Option<ReleaseEvents> {
        let mut lines = self.lines();
        let wake = lines.get_mut(owner)?;
        let (sender, events) = mpsc::channel(1);
        *wake = sender;
        Some(ReleaseEvents::from_channel(events))
    }

    /// `owner` left its line (it got the lock, or gave up).
    pub(crate) fn leave_line(&self, owner: &str) {
        self.lines().remove(owner);
    }

    /// A release handed the lock to `owner`: wakes it if it waits here.
    pub(crate) fn wake_owner(&self, owner: &str) {
        if let Some(wake) = self.lines().get(owner) {
            // Full: a wake-up is pending already. Closed: the attempt is
            // over, and the next one reads the lock anyway.
            let _ = wake.try_send(());
        }
    }

    fn wake_everyone(&self) {
        self.hub.notify_all();
        for wake in self.lines().values() {
            let _ = wake.try_send(());
        }
    }

    fn lines(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<()>>> {
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
        let mut sink = self.sink.lock().await;
        if let Some(live) = sink.as_mut() {
            match timeout(self.timeout, live.subscribe(channel)).await {
                Ok(Ok(())) => return Ok(subscription.events),
                // The connection is broken: open a new one below.
                Ok(Err(_)) | Err(_) => *sink = None,
            }
        }
        let stream = self
            .reconnect(&mut sink)
            .await
            .map_err(|error| self.subscribe_failed(key, error))?;
        tokio::spawn(read_messages(Arc::downgrade(self), stream));
        Ok(subscription.events)
    }

    /// Opens a pub/sub connection, subscribes to every channel someone waits
    /// on, and returns the message stream to read. `None` as error: a timeout.
    async fn reconnect(
        &self,
        sink: &mut Option<PubSubSink>,
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
        *sink = Some(new_sink);
        self.connected.store(true, Ordering::Release);
        // Releases may have been missed while no connection listened.
        self.wake_everyone();
        Ok(stream)
    }
}

/// Reads release messages. After a disconnect it reconnects while anyone
/// waits (waiters fall back to their TTL hints meanwhile), unless a new
/// subscriber already did.
async fn read_messages(subscriber: Weak<Subscriber>, mut stream: PubSubStream) {
    'connection: loop {
        while let Some(message) = stream.next().await {
            let Some(subscriber) = subscriber.upgrade() else {
                return;
            };
            if message.get_channel_name() == subscriber.own_channel {
                if let Ok(owner) = std::str::from_utf8(message.get_payload_bytes()) {
                    subscriber.wake_owner(owner);
                }
            } else {
                subscriber.hub.notify(message.get_channel_name());
            }
        }
        let Some(live) = subscriber.upgrade() else { return };
        *live.sink.lock().await = None;
        live.connected.store(false, Ordering::Release);
        live.wake_everyone();
        warn!("the pub/sub connection closed; reconnecting");
        let mut pause = Duration::from_millis(50);
        loop {
            if live.nobody_waits() {
                debug!("nobody waits; the pub/sub connection stays closed until needed");
                return;
            }
            {
                let mut sink = live.sink.lock().await;
                if sink.is_some() {
                    return; // a subscriber reconnected first and reads the new connection
                }
                if let Ok(new_stream) = live.reconnect(&mut sink).await {
                    debug!("pub/sub reconnected");
                    stream = new_stream;
                    continue 'connection;
                }
            }
            sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

/// Unsubscribes from channels nobody waits on any more.
async fn unsubscribe_idle(subscriber: Weak<Subscriber>, mut idle: mpsc::UnboundedReceiver<String>) {
    while let Some(channel) = idle.recv().await {
        let Some(subscriber) = subscriber.upgrade() else {
            return;
        };
        let mut sink = subscriber.sink.lock().await;
        // A new waiter may have subscribed again meanwhile.
        if subscriber.hub.keys_with_subscribers().contains(&channel) {
            continue;
        }
        if let Some(live) = sink.as_mut() {
            if let Err(error) = live.unsubscribe(&channel).await {
                debug!(%error, "unsubscribe failed; the reconnect will drop the channel");
            }
        }
    }
}
