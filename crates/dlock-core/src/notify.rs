//! Release notifications: how a backend wakes the requests waiting for a key.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, watch};

type IdleHook = Box<dyn Fn(&str) + Send + Sync>;

/// A registry of the keys that waiters listen on, shared by a backend's clones.
///
/// A backend calls [`ReleaseHub::subscribe`] from
/// [`LockBackend::subscribe`](crate::LockBackend::subscribe) and
/// [`ReleaseHub::notify`] when it learns that a key was released (its own
/// release, or a message from the server). Subscriptions are counted: when the
/// last one for a key is dropped the key's entry is removed and the idle hook
/// runs, so that a backend can unsubscribe on the server; a cancelled waiter
/// leaves nothing behind.
///
/// ```
/// use dlock_core::ReleaseHub;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let hub = ReleaseHub::new();
/// let subscription = hub.subscribe("orders/42");
/// assert!(subscription.first);
/// let mut events = subscription.events;
/// hub.notify("orders/42");
/// assert!(events.recv().await); // woken by the release
/// drop(events);
/// assert_eq!(hub.len(), 0); // nothing left behind
/// # }
/// ```
#[derive(Clone, Default)]
pub struct ReleaseHub {
    inner: Arc<HubInner>,
}

#[derive(Default)]
struct HubInner {
    keys: Mutex<HashMap<String, KeyEntry>>,
    on_idle: Option<IdleHook>,
}

struct KeyEntry {
    sender: watch::Sender<u64>,
    subscribers: usize,
}

/// What [`ReleaseHub::subscribe`] returns.
#[derive(Debug)]
#[non_exhaustive]
pub struct HubSubscription {
    /// The events to wait on.
    pub events: ReleaseEvents,
    /// True when this is the only subscription for the key: the backend should
    /// start listening on the server before it returns the events.
    pub first: bool,
}

impl ReleaseHub {
    /// An empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty hub that calls `on_idle(key)` when the last subscription for a
    /// key is dropped. The hook runs inside `Drop`, so it must not block: send
    /// a message to a task instead of doing I/O.
    pub fn with_idle_hook(on_idle: impl Fn(&str) + Send + Sync + 'static) -> Self {
        ReleaseHub {
            inner: Arc::new(HubInner {
                keys: Mutex::default(),
                on_idle: Some(Box::new(on_idle)),
            }),
        }
    }

    /// Starts listening for releases of `key`. Only releases notified after
    /// this call wake the returned events.
    pub fn subscribe(&self, key: &str) -> HubSubscription {
        let mut keys = self.keys();
        let (receiver, first) = match keys.get_mut(key) {
            Some(entry) => {
                entry.subscribers += 1;
                (entry.sender.subscribe(), false)
            }
            None => {
                let (sender, receiver) = watch::channel(0);
                keys.insert(
                    key.to_owned(),
                    KeyEntry {
                        sender,
                        subscribers: 1,
                    },
                );
                (receiver, true)
            }
        };
        HubSubscription {
            events: ReleaseEvents {
                source: Source::Hub {
                    receiver,
                    _registration: Registration {
                        hub: self.clone(),
                        key: key.to_owned(),
                    },
                },
            },
            first,
        }
    }

    /// Wakes every current subscriber of `key`.
    pub fn notify(&self, key: &str) {
        if let Some(entry) = self.keys().get(key) {
            entry.sender.send_modify(|generation| *generation += 1);
        }
    }

    /// Wakes every subscriber of every key, e.g. after a reconnect during
    /// which notifications may have been missed.
    pub fn notify_all(&self) {
        for entry in self.keys().values() {
            entry.sender.send_modify(|generation| *generation += 1);
        }
    }

    /// The keys that have at least one subscriber (to subscribe again on the
    /// server after a reconnect).
    pub fn keys_with_subscribers(&self) -> Vec<String> {
        self.keys().keys().cloned().collect()
    }

    /// Number of keys with at least one subscriber.
    pub fn len(&self) -> usize {
        self.keys().len()
    }

    /// True when no key has a subscriber.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyEntry>> {
        // The map stays consistent even if a holder panicked: every update is
        // a single insert, remove or counter change.
        self.inner.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn unsubscribe(&self, key: &str) {
        let idle = {
            let mut keys = self.keys();
            match keys.get_mut(key) {
                Some(entry) if entry.subscribers > 1 => {
                    entry.subscribers -= 1;
                    false
                }
                Some(_) => {
                    keys.remove(key);
                    true
                }
                None => false,
            }
        };
        if idle {
            if let Some(on_idle) = &self.inner.on_idle {
                on_idle(key);
            }
        }
    }
}

impl fmt::Debug for ReleaseHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseHub").field("keys", &self.len()).finish()
    }
}

struct Registration {
    hub: ReleaseHub,
    key: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.key);
    }
}

/// A stream of "the key may be free now" signals for one waiting request.
///
/// Made by a backend from a [`ReleaseHub`], from a channel
/// ([`ReleaseEvents::from_channel`], e.g. fed by a watch on a predecessor
/// key), or [`ReleaseEvents::never`] for backends without notifications
/// (waiters then rely on the TTL hint alone).
pub struct ReleaseEvents {
    source: Source,
}

enum Source {
    Hub {
        receiver: watch::Receiver<u64>,
        _registration: Registration,
    },
    Channel(mpsc::Receiver<()>),
    Never,
}

impl ReleaseEvents {
    /// Events fed by a channel: every message is one wake-up; a closed channel
    /// means no more notifications will come.
    pub fn from_channel(receiver: mpsc::Receiver<()>) -> Self {
        ReleaseEvents {
            source: Source::Channel(receiver),
        }
    }

    /// Events that never fire.
    pub fn never() -> Self {
        ReleaseEvents {
            source: Source::Never,
        }
    }

    /// Waits for the next signal. Returns `false`, at once, when no signal can
    /// come any more (the source closed); the waiter then falls back to its
    /// timer.
    pub async fn recv(&mut self) -> bool {
        match &mut self.source {
            Source::Hub { receiver, .. } => receiver.changed().await.is_ok(),
            Source::Channel(receiver) => receiver.recv().await.is_some(),
            Source::Never => false,
        }
    }
}

impl fmt::Debug for ReleaseEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.source {
            Source::Hub { .. } => "hub",
            Source::Channel(_) => "channel",
            Source::Never => "never",
        };
        f.debug_struct("ReleaseEvents").field("source", &kind).finish()
    }
}
