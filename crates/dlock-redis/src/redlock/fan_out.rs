//! Running one operation on every node at once, and reading the answers.

use std::future::Future;
use std::sync::Arc;

use dlock_core::LockError;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::RedlockBackend;
use crate::{NodeGrant, RedisBackend};

impl RedlockBackend {
    /// Runs `operation` on every node at once, each under the node timeout,
    /// and returns as soon as `decided` says the outcome is known (or all
    /// answered). Unanswered nodes are `None` in [`FanOut::answers`]; once the
    /// outcome is decided their operations are not cancelled but finish in
    /// a background task, so
    /// that a grant or renewal reaches every live node, not just the first
    /// majority, and one node failing later does not cost the lock.
    /// [`FanOut::settle`] waits for them.
    pub(super) async fn fan_out<T, F, Fut>(
        &self,
        key: &str,
        operation: F,
        mut decided: impl FnMut(&Answers<T>) -> bool,
    ) -> FanOut<T>
    where
        T: Send + 'static,
        F: Fn(usize, RedisBackend, Arc<str>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, LockError>> + Send + 'static,
    {
        let key: Arc<str> = Arc::from(key);
        let operation = Arc::new(operation);
        let mut pending: FuturesUnordered<_> = (0..self.inner.nodes.len())
            .map(|index| {
                let (inner, operation, key) =
                    (Arc::clone(&self.inner), Arc::clone(&operation), Arc::clone(&key));
                async move {
                    let node_timeout = inner.node_timeout;
                    let answer = timeout(node_timeout, async {
                        let backend = inner.nodes[index].backend().await?;
                        operation(index, backend, Arc::clone(&key)).await
                    })
                    .await
                    .unwrap_or_else(|_| {
                        Err(LockError::unavailable(
                            Some(&key),
                            format!("no answer within the node timeout of {node_timeout:?}"),
                        ))
                    });
                    (index, answer)
                }
            })
            .collect();
        let mut answers: Answers<T> = self.inner.nodes.iter().map(|_| None).collect();
        while let Some((index, answer)) = pending.next().await {
            answers[index] = Some(answer);
            if decided(&answers) {
                break;
            }
        }
        let (sender, rest) = mpsc::unbounded_channel();
        if !pending.is_empty() {
            // One task for the stragglers, spawned only when there are some.
            tokio::spawn(async move {
                while let Some(answer) = pending.next().await {
                    // The caller may have stopped listening: then nobody needs it.
                    let _ = sender.send(answer);
                }
            });
        }
        FanOut { answers, rest }
    }

    /// [`fan_out`](Self::fan_out) that waits for every node's answer.
    pub(super) async fn fan_out_all<T, F, Fut>(&self, key: &str, operation: F) -> Answers<T>
    where
        T: Send + 'static,
        F: Fn(usize, RedisBackend, Arc<str>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, LockError>> + Send + 'static,
    {
        self.fan_out(key, operation, |_| false).await.answers
    }
}

pub(super) fn count<T>(answers: &[Option<Result<T, LockError>>], test: impl Fn(&T) -> bool) -> usize {
    answers
        .iter()
        .filter(|answer| matches!(answer, Some(Ok(value)) if test(value)))
        .count()
}

/// `(node index, fencing counter)` of every node that granted.
pub(super) fn granted_tokens(answers: &Answers<NodeGrant>) -> Vec<(usize, u64)> {
    answers
        .iter()
        .enumerate()
        .filter_map(|(index, answer)| match answer {
            Some(Ok(NodeGrant::Granted(token))) => Some((index, *token)),
            _ => None,
        })
        .collect()
}

/// One answer per node, `None` while a node has not answered.
pub(super) type Answers<T> = Vec<Option<Result<T, LockError>>>;

/// What a [`fan_out`](RedlockBackend::fan_out) heard by the time the
/// outcome was decided.
pub(super) struct FanOut<T> {
    pub(super) answers: Answers<T>,
    rest: mpsc::UnboundedReceiver<(usize, Result<T, LockError>)>,
}

impl<T> FanOut<T> {
    /// Waits for the nodes that had not answered yet (each bounded by the
    /// node timeout) and returns every answer.
    pub(super) async fn settle(mut self) -> Answers<T> {
        while let Some((index, answer)) = self.rest.recv().await {
            self.answers[index] = Some(answer);
        }
        self.answers
    }
}

pub(super) fn failed<T>(answers: &[Option<Result<T, LockError>>]) -> usize {
    answers
        .iter()
        .filter(|answer| matches!(answer, Some(Err(_))))
        .count()
}
