//! Sessions: one etcd lease per TTL, kept alive in the background and
//! shared by every auto-renewed lock of that TTL.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper};

use crate::members::Members;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep, timeout};
use tracing::{debug, warn};

/// What a session's holders need to know.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionState {
    /// The lease surely lasts until then (last confirmed keep-alive's send
    /// time + TTL).
    pub(crate) valid_until: Instant,
    /// The lease is gone (expired, revoked, or could not be kept alive).
    pub(crate) lost: bool,
}

/// A lease kept alive until dropped (then revoked in the background).
pub(crate) struct Session {
    pub(crate) lease: i64,
    /// The TTL asked for, in seconds (the key in the backend's session map).
    pub(crate) seconds: i64,
    state: watch::Receiver<SessionState>,
    keeper: AbortHandle,
    members: Arc<Members>,
}

impl Session {
    /// Grants a lease of `ttl_secs` (the server may raise it to its
    /// minimum) and starts keeping it alive.
    pub(crate) async fn start(
        mut client: Client,
        members: Arc<Members>,
        ttl_secs: i64,
    ) -> Result<Arc<Session>, etcd_client::Error> {
        let sent = Instant::now();
        let granted = client.lease_grant(ttl_secs, None).await?;
        let ttl = Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(1).max(1));
        let (sender, state) = watch::channel(SessionState {
            valid_until: sent + ttl,
            lost: false,
        });
        let keeper = tokio::spawn(keep_alive(Arc::clone(&members), granted.id(), ttl, sender)).abort_handle();
        debug!(lease = granted.id(), ?ttl, "session started");
        Ok(Arc::new(Session {
            lease: granted.id(),
            seconds: ttl_secs,
            state,
            keeper,
            members,
        }))
    }

    pub(crate) fn state(&self) -> SessionState {
        *self.state.borrow()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.keeper.abort();
        let members = Arc::clone(&self.members);
        let lease = self.lease;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let revoke = |mut client: Client| async move { client.lease_revoke(lease).await };
                let _ = members.call(Duration::from_secs(2), revoke).await;
            });
        }
    }
}

/// Renews the lease every third of its TTL over one keep-alive stream,
/// reopening the stream after errors, until the lease cannot be confirmed
/// before it would expire, or the server says it is gone.
async fn keep_alive(members: Arc<Members>, lease: i64, ttl: Duration, state: watch::Sender<SessionState>) {
    let period = ttl / 3;
    let mut stream: Option<(usize, LeaseKeeper, LeaseKeepAliveStream)> = None;
    let mut pause = period;
    loop {
        sleep(pause).await;
        let valid_until = state.borrow().valid_until;
        let sent = Instant::now();
        // One member gets at most a period (or half a second): a member that
        // hangs must not use up the lease.
        let limit = valid_until
            .saturating_duration_since(sent)
            .min(period.max(Duration::from_millis(500)));
        let answer = timeout(limit, async {
            if stream.is_none() {
                let (member, mut client) = members.current();
                let (keeper, responses) = client.lease_keep_alive(lease).await?;
                stream = Some((member, keeper, responses));
            }
            let Some((_, keeper, responses)) = stream.as_mut() else {
                return Ok(None);
            };
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                state.send_modify(|state| state.valid_until = sent + ttl);
                pause = period;
                continue;
            }
            Ok(Ok(Some(_))) => {
                warn!(
                    lease,
                    "the session's lease is gone (expired or revoked); its locks are lost"
                );
                state.send_modify(|state| state.lost = true);
                return;
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => {
                debug!(
                    lease,
                    "keep-alive failed; reopening the stream on the next member"
                );
                if let Some((member, _, _)) = stream.take() {
                    members.failed(member);
                }
            }
        }
        if Instant::now() >= valid_until {
            warn!(
                lease,
                "the session's lease could not be renewed before it expired; its locks are lost"
            );
            state.send_modify(|state| state.lost = true);
            return;
        }
        pause = Duration::from_millis(100).min(period);
    }
}
