//! Settings for a Redlock backend, and connecting to its nodes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dlock_core::LockError;
use dlock_core::backend::{HostListUrl, redact_url, validate_timeout};
use tracing::debug;

use super::node::{Node, NodeState};
use super::{Redlock, RedlockBackend};
use crate::RedisBackend;

/// Settings for [`RedlockBackend`]; start with [`RedlockBackend::builder`].
#[derive(Clone)]
pub struct RedlockBackendBuilder {
    urls: Vec<String>,
    /// Why a `redlock://` URL could not be read, reported by `connect`.
    invalid: Option<String>,
    key_prefix: String,
    node_timeout: Duration,
    connect_timeout: Duration,
    drift_factor: f64,
}

impl RedlockBackend {
    /// Connects to the masters at `urls` with default settings; at least a
    /// majority must answer (the others are retried on use). `urls` is
    /// either one `redis://[user:password@]host:port[/db]` URL per master,
    /// or a single `redlock://[user:password@]h1:port,h2:port,h3:port` URL
    /// naming them all (the credentials apply to each).
    pub async fn connect<I, S>(urls: I) -> Result<Self, LockError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::builder(urls).connect().await
    }

    /// Settings for the masters at `urls` (see [`connect`](Self::connect)
    /// for the forms).
    pub fn builder<I, S>(urls: I) -> RedlockBackendBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut urls: Vec<String> = urls.into_iter().map(|url| url.as_ref().to_owned()).collect();
        let mut invalid = None;
        if let [single] = urls.as_slice() {
            if single.starts_with("redlock://") {
                match HostListUrl::parse(single) {
                    Ok(parsed) => {
                        let userinfo = parsed.userinfo();
                        urls = parsed
                            .hosts
                            .iter()
                            .map(|host| format!("redis://{userinfo}{host}"))
                            .collect();
                    }
                    Err(reason) => invalid = Some(reason),
                }
            }
        }
        RedlockBackendBuilder {
            urls,
            invalid,
            key_prefix: RedisBackend::DEFAULT_KEY_PREFIX.to_owned(),
            node_timeout: Self::DEFAULT_NODE_TIMEOUT,
            connect_timeout: RedisBackend::DEFAULT_CONNECT_TIMEOUT,
            drift_factor: Self::DEFAULT_DRIFT_FACTOR,
        }
    }
}

impl RedlockBackendBuilder {
    /// Prefix of every key and channel on every node (default `dlock:`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Limit for one node's answer to one command (default 100 ms). Keep
    /// it small next to the TTL: an acquisition never waits longer than
    /// this for a slow node.
    pub fn node_timeout(mut self, limit: Duration) -> Self {
        self.node_timeout = limit;
        self
    }

    /// Limit for connecting to the nodes at start (default 5 s).
    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// Clock drift factor (default 0.01): the validity of a grant is
    /// `ttl − elapsed − (factor · ttl + 2 ms)`. From 0 to 0.5.
    pub fn drift_factor(mut self, factor: f64) -> Self {
        self.drift_factor = factor;
        self
    }

    /// Connects to every node at once; fails with
    /// [`LockError::InvalidOptions`] for bad settings or URLs (duplicates
    /// included) and [`LockError::Unavailable`] (naming each failed node)
    /// when fewer than a majority answer.
    pub async fn connect(self) -> Result<RedlockBackend, LockError> {
        let invalid = |reason: String| LockError::invalid_options(None, reason);
        if let Some(reason) = &self.invalid {
            return Err(invalid(reason.clone()));
        }
        if self.urls.is_empty() {
            return Err(invalid(
                "no Redlock nodes given; pass the URLs of N independent masters (5 is usual)".into(),
            ));
        }
        let mut seen = self.urls.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.urls.len() {
            return Err(invalid(
                "a Redlock node is listed twice; each URL must name a different master".into(),
            ));
        }
        if !(0.0..0.5).contains(&self.drift_factor) {
            return Err(invalid(format!(
                "drift factor {} is out of range; use 0 to 0.5 (default 0.01)",
                self.drift_factor
            )));
        }
        validate_timeout("node timeout", self.node_timeout, Duration::from_secs(60))?;
        let nodes: Vec<Node> = self
            .urls
            .iter()
            .map(|url| {
                let builder = RedisBackend::builder(url)
                    .key_prefix(self.key_prefix.clone())
                    .command_timeout(self.node_timeout)
                    .connect_timeout(self.connect_timeout);
                Node::new(redact_url(url), builder)
            })
            .collect();
        let quorum = nodes.len() / 2 + 1;
        let connected: Vec<Result<(), LockError>> =
            futures_util::future::join_all(nodes.iter().map(|node| async move { node.connect().await }))
                .await;
        let mut failures = Vec::new();
        for (node, outcome) in nodes.iter().zip(connected) {
            match outcome {
                // A bad URL or setting: report it as such, not as a node failure.
                Err(error @ LockError::InvalidOptions { .. }) => return Err(error),
                Err(error) => failures.push(format!("{}: {error}", node.address)),
                Ok(()) => {}
            }
        }
        if nodes.len() - failures.len() < quorum {
            return Err(LockError::unavailable(
                None,
                format!(
                    "only {} of {} Redlock nodes answered, a majority ({quorum}) is needed; {}",
                    nodes.len() - failures.len(),
                    nodes.len(),
                    failures.join("; ")
                ),
            ));
        }
        for failure in &failures {
            debug!(%failure, "a Redlock node is down at start; it is retried on use");
        }
        same_server_twice(&nodes).await?;
        Ok(RedlockBackend {
            inner: Arc::new(Redlock {
                nodes,
                quorum,
                node_timeout: self.node_timeout,
                drift_factor: self.drift_factor,
            }),
        })
    }
}

/// Fails when two of the connected nodes are one Redis process (the same
/// `run_id`), however differently their URLs spell it (`localhost` and
/// `127.0.0.1`, another database number): such a "majority" is one server.
async fn same_server_twice(nodes: &[Node]) -> Result<(), LockError> {
    let live: Vec<Option<RedisBackend>> = nodes
        .iter()
        .map(|node| match &*node.state.borrow() {
            NodeState::Live(backend) => Some(backend.clone()),
            _ => None,
        })
        .collect();
    let run_ids = futures_util::future::join_all(live.iter().map(|backend| async move {
        match backend {
            Some(backend) => backend.server_run_id().await,
            None => Ok(None),
        }
    }))
    .await;
    let mut seen: Vec<(String, &str)> = Vec::new();
    for (node, run_id) in nodes.iter().zip(run_ids) {
        let Some(run_id) = run_id? else {
            continue;
        };
        if let Some((_, first)) = seen.iter().find(|(id, _)| *id == run_id) {
            return Err(LockError::invalid_options(
                None,
                format!(
                    "{first} and {} are the same Redis server (run_id {run_id}); each Redlock node must be a different master",
                    node.address
                ),
            ));
        }
        seen.push((run_id, &node.address));
    }
    Ok(())
}

impl fmt::Debug for RedlockBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.urls.iter().map(|url| redact_url(url)).collect();
        f.debug_struct("RedlockBackendBuilder")
            .field("nodes", &nodes)
            .field("key_prefix", &self.key_prefix)
            .field("node_timeout", &self.node_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("drift_factor", &self.drift_factor)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::RedlockBackend;

    #[test]
    fn one_redlock_url_names_every_node() {
        let builder = RedlockBackend::builder(["redlock://:pw@h1:6379,h2:6379,h3:6379"]);
        assert_eq!(
            builder.urls,
            [
                "redis://:pw@h1:6379",
                "redis://:pw@h2:6379",
                "redis://:pw@h3:6379"
            ]
        );
        assert!(builder.invalid.is_none());
        assert!(RedlockBackend::builder(["redlock://h1"]).invalid.is_some());
        let listed = RedlockBackend::builder(["redis://h1:1", "redis://h2:2"]);
        assert_eq!(listed.urls, ["redis://h1:1", "redis://h2:2"]);
    }
}
