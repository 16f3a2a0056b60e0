//! Deletion watches, all on one watch stream per backend.
//!
//! Every held lock watches its own key (the loss signal) and every waiter
//! its predecessor's. etcd-client opens a new gRPC stream for each
//! `watch` call; one stream carrying many watches (etcd allows that, each
//! watch named by an id the client picks) saves a stream set-up and
//! tear-down per acquisition on both sides. One task per backend owns the
//! stream: it creates and cancels watches as they come and go, hands each
//! deletion to its waiter, and when the stream breaks it opens one on the
//! next member and creates every live watch again from the revision it
//! watched from, so that no deletion is missed.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use dlock_core::backend::Backoff;
use etcd_client::{
    EventType, WatchFilterType, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::debug;

use crate::members::Members;

/// Starts watches on the backend's watch stream.
pub(crate) struct Watches {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicI64,
}

enum Command {
    Watch {
        id: i64,
        key: String,
        from_revision: i64,
        /// Any change fires, a put too, not only a deletion.
        puts: bool,
        /// Every key under `key` is watched, not `key` alone.
        prefix: bool,
        deleted: oneshot::Sender<i64>,
    },
    Forget(i64),
}

impl Watches {
    /// Starts the task that owns the stream (opened on first use).
    pub(crate) fn start(members: Arc<Members>) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        tokio::spawn(Hub::new(members).run(receiver));
        Watches {
            commands,
            next_id: AtomicI64::new(1),
        }
    }

    /// Resolves when `key` is deleted at a revision after `after_revision`.
    /// Dropping it cancels the watch.
    pub(crate) fn deletion(&self, key: String, after_revision: i64) -> Deletion {
        self.watch(key, after_revision, false, false)
    }

    /// Resolves when `key` is written or deleted at a revision after
    /// `after_revision`. Dropping it cancels the watch.
    pub(crate) fn change(&self, key: String, after_revision: i64) -> Deletion {
        self.watch(key, after_revision, true, false)
    }

    /// Resolves when any key under `prefix` is written or deleted at a
    /// revision after `after_revision`; [`Deletion::revision`] says at
    /// which. Dropping it cancels the watch.
    pub(crate) fn change_under(&self, prefix: String, after_revision: i64) -> Deletion {
        self.watch(prefix, after_revision, true, true)
    }

    fn watch(&self, key: String, after_revision: i64, puts: bool, prefix: bool) -> Deletion {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (deleted, receiver) = oneshot::channel();
        let _ = self.commands.send(Command::Watch {
            id,
            key,
            from_revision: after_revision + 1,
            puts,
            prefix,
            deleted,
        });
        Deletion {
            id,
            receiver,
            commands: self.commands.clone(),
        }
    }
}

/// A watch for one key's deletion; see [`Watches::deletion`].
pub(crate) struct Deletion {
    id: i64,
    /// The revision of the response that fired it (0: the watch was refused).
    receiver: oneshot::Receiver<i64>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Deletion {
    /// Resolves as the watch does, with the revision it fired at.
    pub(crate) async fn revision(mut self) -> i64 {
        match (&mut self.receiver).await {
            Ok(revision) => revision,
            // The task ended (a runtime shutting down): nothing will come.
            Err(_) => std::future::pending().await,
        }
    }
}

impl Future for Deletion {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        match Pin::new(&mut self.receiver).poll(context) {
            Poll::Ready(Ok(_)) => Poll::Ready(()),
            // An error: the task ended (a runtime shutting down), so nothing will come.
            _ => Poll::Pending,
        }
    }
}

impl Drop for Deletion {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Forget(self.id));
    }
}

struct Watched {
    key: String,
    /// Events from this revision on are still to be seen.
    from_revision: i64,
    /// A put fires too.
    puts: bool,
    /// The whole prefix is watched.
    prefix: bool,
    deleted: oneshot::Sender<i64>,
}

struct Stream {
    member: usize,
    requests: WatchRequestSender,
    responses: WatchResponseStream,
}

struct Hub {
    members: Arc<Members>,
    watched: HashMap<i64, Watched>,
    /// Watches to create on the next stream (or the current one).
    unsent: VecDeque<i64>,
    /// Created on the current stream, in order, not yet confirmed.
    unconfirmed: VecDeque<i64>,
    /// Watches on the current stream that nobody waits for any more.
    to_cancel: Vec<i64>,
    stream: Option<Stream>,
    /// After a failure, no new stream before then.
    reopen_at: Instant,
    /// Pauses between failed streams; reset by every response.
    backoff: Backoff,
}

impl Hub {
    fn new(members: Arc<Members>) -> Self {
        Hub {
            members,
            watched: HashMap::new(),
            unsent: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            to_cancel: Vec::new(),
            stream: None,
            reopen_at: Instant::now(),
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            if let Err(error) = self.send_requests().await {
                self.stream_broke(&error);
            }
            let waiting_to_reopen = self.stream.is_none() && !self.unsent.is_empty();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    // The backend and every watch are gone.
                    None => return,
                },
                response = next_response(&mut self.stream) => match response {
                    Ok(Some(response)) => self.response(&response),
                    Ok(None) => self.stream_broke("the stream ended"),
                    Err(error) => self.stream_broke(&error.to_string()),
                },
                () = sleep_until(self.reopen_at), if waiting_to_reopen => {}
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Watch {
                id,
                key,
                from_revision,
                puts,
                prefix,
                deleted,
            } => {
                self.watched.insert(
                    id,
                    Watched {
                        key,
                        from_revision,
                        puts,
                        prefix,
                        deleted,
                    },
                );
                self.unsent.push_back(id);
            }
            Command::Forget(id) => {
                if self.watched.remove(&id).is_none() {
                    return;
                }
                if let Some(position) = self.unsent.iter().position(|unsent| *unsent == id) {
                    self.unsent.remove(position);
                } else {
                    self.to_cancel.push(id);
                }
            }
        }
    }

    /// Cancels the watches nobody waits for, and creates the unsent ones,
    /// opening a stream first if there is none.
    async fn send_requests(&mut self) -> Result<(), String> {
        if let Some(stream) = &mut self.stream {
            for id in self.to_cancel.drain(..) {
                stream
                    .requests
                    .cancel(id)
                    .await
                    .map_err(|error| error.to_string())?;
            }
        }
        while let Some(&id) = self.unsent.front() {
            let Some(watched) = self.watched.get(&id) else {
                self.unsent.pop_front();
                continue;
            };
            let mut options = WatchOptions::new()
                .with_start_revision(watched.from_revision)
                .with_watch_id(id);
            if !watched.puts {
                options = options.with_filters([WatchFilterType::NoPut]);
            }
            if watched.prefix {
                options = options.with_prefix();
            }
            let key = watched.key.clone();
            match &mut self.stream {
                Some(stream) => stream
                    .requests
                    .watch(key, Some(options))
                    .await
                    .map_err(|error| error.to_string())?,
                None => {
                    if Instant::now() < self.reopen_at {
                        return Ok(());
                    }
                    // Opening the stream sends the first watch.
                    let (member, mut client) = self.members.current();
                    let opened = timeout(Duration::from_secs(5), client.watch(key, Some(options))).await;
                    let (requests, responses) = match opened {
                        Ok(Ok(stream)) => stream.split(),
                        Ok(Err(error)) => {
                            self.members.failed(member);
                            return Err(error.to_string());
                        }
                        Err(_) => {
                            self.members.failed(member);
                            return Err("no answer within 5 s".to_owned());
                        }
                    };
                    self.stream = Some(Stream {
                        member,
                        requests,
                        responses,
                    });
                }
            }
            self.unsent.pop_front();
            self.unconfirmed.push_back(id);
        }
        Ok(())
    }

    fn response(&mut self, response: &WatchResponse) {
        self.backoff.reset();
        if response.created() {
            let Some(id) = self.unconfirmed.pop_front() else {
                return;
            };
            if response.canceled() {
                // Refused (no permission to read the key, say): wake the
                // waiter, whose next attempt reads the key and tells.
                debug!(reason = response.cancel_reason(), "a watch was refused");
                if let Some(watched) = self.watched.remove(&id) {
                    let _ = watched.deleted.send(0);
                }
            }
            return;
        }
        let id = response.watch_id();
        if response.compact_revision() > 0 {
            // Watched from a revision compacted since: watch again from the
            // oldest one kept. A deletion older than that is caught by the
            // holder's next renewal, or by the waiter's `retry_after`.
            if let Some(watched) = self.watched.get_mut(&id) {
                watched.from_revision = watched.from_revision.max(response.compact_revision());
                self.unsent.push_back(id);
            }
            return;
        }
        // A watch with puts filtered out sees deletions only; one without
        // fires on any event.
        let puts = self.watched.get(&id).is_some_and(|watched| watched.puts);
        let deleted = response
            .events()
            .iter()
            .any(|event| puts || event.event_type() == EventType::Delete);
        if deleted {
            if let Some(watched) = self.watched.remove(&id) {
                let revision = response.header().map_or(0, |header| header.revision());
                let _ = watched.deleted.send(revision);
            }
            // The name may be written again: stop watching it.
            self.to_cancel.push(id);
        } else if response.canceled() && self.watched.contains_key(&id) {
            // Cancelled by the server, not by us: watch again.
            self.unsent.push_back(id);
        }
    }

    /// Drops the stream and queues every live watch for the next one.
    fn stream_broke(&mut self, error: &str) {
        if let Some(stream) = self.stream.take() {
            debug!(error, "the watch stream broke; reopening on the next member");
            self.members.failed(stream.member);
        }
        self.unconfirmed.clear();
        self.to_cancel.clear();
        self.unsent = self.watched.keys().copied().collect();
        self.reopen_at = Instant::now() + self.backoff.next_delay();
    }
}

/// The stream's next response; pending while there is no stream.
async fn next_response(stream: &mut Option<Stream>) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match stream {
        Some(stream) => stream.responses.message().await,
        None => std::future::pending().await,
    }
}
