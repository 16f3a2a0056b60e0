//! One Redlock node: a single-server backend, connected at start or, if
//! it was down, by a task of its own on first use.

use std::sync::Arc;

use dlock_core::LockError;
use tokio::sync::watch;
use tracing::debug;

use crate::{RedisBackend, RedisBackendBuilder};

/// One master; connected at start, or later, in the background, if it was
/// down then.
pub(super) struct Node {
    pub(super) address: String,
    builder: RedisBackendBuilder,
    pub(super) state: Arc<watch::Sender<NodeState>>,
}

/// Where a node's connection stands.
#[derive(Clone)]
pub(super) enum NodeState {
    /// Not connected; no attempt under way. The last failure, if any.
    Down(Option<Arc<str>>),
    /// An attempt is under way in a task of its own.
    Connecting,
    Live(RedisBackend),
}

impl Node {
    pub(super) fn new(address: String, builder: RedisBackendBuilder) -> Self {
        Node {
            address,
            builder,
            state: Arc::new(watch::Sender::new(NodeState::Down(None))),
        }
    }

    /// Connects at start, reporting why not.
    pub(super) async fn connect(&self) -> Result<(), LockError> {
        let backend = self.builder.clone().connect().await?;
        self.state.send_replace(NodeState::Live(backend));
        Ok(())
    }

    /// The node's backend; if it is not connected, starts a connect in a
    /// task of its own and waits for it. The caller bounds the wait (the
    /// node timeout), never the connect: a connect that takes longer than
    /// the node timeout (a TLS handshake, a lost SYN) still completes and
    /// serves the next operation, instead of being cut off every time.
    pub(super) async fn backend(&self) -> Result<RedisBackend, LockError> {
        let mut states = self.state.subscribe();
        self.state.send_if_modified(|state| {
            if !matches!(state, NodeState::Down(_)) {
                return false;
            }
            *state = NodeState::Connecting;
            let (builder, node) = (self.builder.clone(), Arc::clone(&self.state));
            let address = self.address.clone();
            tokio::spawn(async move {
                let next = match builder.connect().await {
                    Ok(backend) => NodeState::Live(backend),
                    Err(error) => {
                        debug!(%address, %error, "a Redlock node could not be reached; tried again on next use");
                        NodeState::Down(Some(Arc::from(error.to_string())))
                    }
                };
                node.send_replace(next);
            });
            true
        });
        let settled = states
            .wait_for(|state| !matches!(state, NodeState::Connecting))
            .await
            .map(|state| state.clone());
        match settled {
            Ok(NodeState::Live(backend)) => Ok(backend),
            Ok(NodeState::Down(Some(why))) => Err(LockError::unavailable(None, why.to_string())),
            _ => Err(LockError::unavailable(
                None,
                format!("{} is not connected", self.address),
            )),
        }
    }
}
