//! Backend URLs: the scheme picks the backend crate, which reads the rest
//! (each library understands its own URL forms).

use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_etcd::EtcdBackend;
use dlock_redis::{RedisBackend, RedlockBackend};

/// The accepted URL forms, shown when a URL is not one of them.
pub(crate) const ACCEPTED_FORMS: &str = "accepted backend URLs:
  redis://[user:password@]host:port[/db]          one Redis server (rediss:// for TLS)
  redis+sentinel://[user:password@]h1:26379,h2:26379/MASTER
                                                   the master that Redis Sentinel names MASTER
  redis+cluster://[user:password@]h1:7000,h2:7001  a Redis Cluster, by any of its nodes
  redlock://[user:password@]h1:6379,h2:6379,h3:6379
                                                   Redlock over independent Redis masters
  etcd://[user:password@]h1:2379,h2:2379           an etcd cluster (etcd+https:// for TLS)";

/// Connects to the backend `url` names, with `timeout` as the limit for
/// connecting and for each request. A URL no backend accepts is
/// [`LockError::InvalidOptions`].
pub(crate) async fn connect(url: &str, timeout: Duration) -> Result<Locker, LockError> {
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    Ok(match scheme {
        "redis" | "rediss" | "redis+sentinel" | "redis+cluster" => Locker::new(
            RedisBackend::builder(url)
                .connect_timeout(timeout)
                .command_timeout(timeout)
                .connect()
                .await?,
        ),
        "redlock" => Locker::new(
            RedlockBackend::builder([url])
                .connect_timeout(timeout)
                .connect()
                .await?,
        ),
        "etcd" | "etcd+http" | "etcd+https" => Locker::new(
            EtcdBackend::builder([url])
                .connect_timeout(timeout)
                .request_timeout(timeout)
                .connect()
                .await?,
        ),
        "" => return Err(LockError::invalid_options(None, "no scheme")),
        other => {
            return Err(LockError::invalid_options(
                None,
                format!("unknown scheme {other:?}"),
            ));
        }
    })
}
