//! One client per member, and failover between them.
//!
//! etcd-client balances requests over all endpoints but leaves a dead
//! member in the pool, so requests routed to it keep failing. Like etcd's
//! own Go client, dlock talks to one member at a time and moves on to the
//! next when that member fails to answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, Error};
use tokio::time::{Instant, timeout};
use tonic::Code;

/// The members' clients and which one is in use.
pub(crate) struct Members {
    clients: Vec<Client>,
    current: AtomicUsize,
}

/// Why a request ended without an answer.
pub(crate) enum Failure {
    /// The server answered with an error that another member would repeat.
    Refused(Error),
    /// No member answered in time; the last error seen, if any.
    NoAnswer(Option<Error>),
}

impl Members {
    pub(crate) fn new(clients: Vec<Client>) -> Self {
        Members {
            clients,
            current: AtomicUsize::new(0),
        }
    }

    /// Makes the leader the member in use, if the members that answer
    /// within `limit` name one among them; else the member in use stays.
    /// Returns as soon as the leader is known, so a member that hangs
    /// delays this only when the leader is not found first. Only a start:
    /// after an election, requests go on to a follower that forwards them,
    /// until that member fails to answer.
    pub(crate) async fn prefer_leader(&self, limit: Duration) {
        let mut asking = tokio::task::JoinSet::new();
        for (index, client) in self.clients.iter().enumerate() {
            let mut client = client.clone();
            asking.spawn(async move {
                let status = timeout(limit, client.status()).await.ok()?.ok()?;
                let member = status.header()?.member_id();
                Some((index, member, status.leader()))
            });
        }
        // Which member leads (0: "none known") and which member is where.
        let mut leader = 0;
        let mut members: Vec<(usize, u64)> = Vec::new();
        while let Some(joined) = asking.join_next().await {
            let Ok(Some((index, member, named))) = joined else {
                continue;
            };
            members.push((index, member));
            if leader == 0 {
                leader = named;
            }
            if let Some(&(index, _)) = members
                .iter()
                .find(|(_, member)| leader != 0 && *member == leader)
            {
                self.current.store(index, Ordering::Relaxed);
                return; // dropping the set stops the other questions
            }
        }
    }

    /// The client in use.
    pub(crate) fn current(&self) -> (usize, Client) {
        let index = self.current.load(Ordering::Relaxed) % self.clients.len().max(1);
        (index, self.clients[index].clone())
    }

    /// Moves on from member `index` (unless another caller already did).
    pub(crate) fn failed(&self, index: usize) {
        let next = (index + 1) % self.clients.len().max(1);
        let _ = self
            .current
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Runs `request` on the member in use, moving to the next member when
    /// one cannot answer, until `limit` has passed. Each member gets a fair
    /// share of the time so that one hanging member cannot use it all.
    pub(crate) async fn call<T, F, Fut>(&self, limit: Duration, mut request: F) -> Result<T, Failure>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let deadline = Instant::now() + limit;
        let share =
            (limit / u32::try_from(self.clients.len()).unwrap_or(1).max(1)).max(Duration::from_millis(200));
        let mut last = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(Failure::NoAnswer(last));
            }
            let (index, client) = self.current();
            match timeout(share.min(deadline - now), request(client)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) if member_failed(&error) => {
                    self.failed(index);
                    last = Some(error);
                }
                Ok(Err(error)) => return Err(Failure::Refused(error)),
                Err(_) => self.failed(index),
            }
        }
    }
}

/// Errors that say "this member cannot answer now" (down, unreachable, or
/// cut off from the leader), as opposed to an answer from the cluster.
fn member_failed(error: &Error) -> bool {
    match error {
        Error::TransportError(_) | Error::IoError(_) => true,
        Error::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => true,
            Code::Unknown => {
                let message = status.message();
                message.contains("transport") || message.contains("connect")
            }
            _ => false,
        },
        _ => false,
    }
}
