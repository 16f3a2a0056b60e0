//! Shared pieces of the cross-backend suites: harnesses for each backend and
//! the environment variables through which `cargo xtask` hands over servers.

#![forbid(unsafe_code)]

/// Reads a server address that `cargo xtask integration` hands to the suites.
///
/// Panics with the command to run when it is missing: a suite never skips
/// silently because its server was not started.
pub fn server_from_env(variable: &str) -> String {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{variable} is not set: this test needs a real server. Run the suites with \
             `cargo xtask integration` (or start servers with `cargo xtask servers` and export what it prints)"
        ),
    }
}

/// A comma-separated list of addresses that xtask hands over.
pub(crate) fn list_from_env(variable: &str) -> Vec<String> {
    server_from_env(variable).split(',').map(str::to_owned).collect()
}

mod certificates;
mod etcd;
mod redis;
pub mod redis_cases;

pub use certificates::TestCertificates;
pub use etcd::*;
pub use redis::*;

/// Asserts that `connecting` ends in [`dlock_core::LockError::Unavailable`]
/// (naming the cause, not hanging) within `limit`, and returns its message.
pub async fn assert_unavailable_within<T: std::fmt::Debug>(
    limit: std::time::Duration,
    connecting: impl std::future::Future<Output = Result<T, dlock_core::LockError>>,
) -> String {
    let began = std::time::Instant::now();
    let outcome = connecting.await;
    let took = began.elapsed();
    match outcome {
        Err(error @ dlock_core::LockError::Unavailable { .. }) => {
            assert!(took < limit, "Unavailable only after {took:?} (limit {limit:?})");
            error.to_string()
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// A URL on a loopback port that was free a moment ago: nothing listens there.
pub fn unused_address() -> String {
    let port = dlock_servers::free_port().expect("a free port");
    format!("127.0.0.1:{port}")
}

/// Polls the redis-server on `port` until a waiter stands in the line
/// `line_key` and a backend listens for hand-overs; false if not within
/// `limit`.
pub async fn in_line_within(port: u16, line_key: &str, limit: std::time::Duration) -> bool {
    let began = std::time::Instant::now();
    while began.elapsed() < limit {
        let in_line = dlock_servers::redis::command(port, &["LLEN", line_key])
            .map(dlock_servers::redis::Reply::text)
            .is_ok_and(|length| length.trim() != "0");
        let listening = dlock_servers::redis::command(port, &["PUBSUB", "CHANNELS", "dlock:client:*"])
            .map(dlock_servers::redis::Reply::text)
            .is_ok_and(|channels| !channels.trim().is_empty());
        if in_line && listening {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}
