//! Redis backend for [dlock](dlock_core): distributed locks with fencing
//! tokens, loss signals and pub/sub wake-ups, on a single Redis server, a
//! Redis Cluster (`RedisBackend::connect_cluster`) or a Sentinel-managed
//! master (`RedisBackend::connect_sentinel`).
//!
//! Every lock operation is one round trip: a Lua script called by EVALSHA
//! (loaded on first use). The lock key holds the owner's secret with a PX
//! TTL; a counter key in the same hash slot gives the fencing token.
//! Waiters stand in a line on the server; a release hands the lock straight
//! to the first waiter (a short reservation with a new fencing token) and
//! tells the waiter's backend on that backend's own channel, read by one
//! pub/sub connection per backend. A waiter with auto-renewal takes the
//! lock from that message; one without makes it its own with one round
//! trip.
//!
//! ```no_run
//! use std::time::Duration;
//! use dlock_redis::{Locker, RedisBackend};
//!
//! # async fn demo() -> Result<(), dlock_redis::LockError> {
//! let backend = RedisBackend::connect("redis://127.0.0.1:6379/0").await?;
//! let locker = Locker::new(backend);
//! let guard = locker.lock("orders/42").ttl(Duration::from_secs(10)).await?;
//! let token = guard.fencing_token(); // send it with every write
//! # let _ = token;
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! Keys in Redis: `{prefix}{<key>}` holds the lock, `{prefix}{<key>}:fence`
//! the fencing counter (kept forever so tokens keep rising; one small key
//! per lock name), `{prefix}{<key>}:line` and `{prefix}{<key>}:places` the
//! waiters' line (only while someone waits), and `{prefix}{<key>}:released`
//! is the release channel.

//!
//! # Features
//!
//! | feature | default | brings |
//! |---|---|---|
//! | `cluster` | on | `RedisBackend::connect_cluster`, `redis+cluster://` URLs (redis-rs `cluster-async`) |
//! | `sentinel` | on | `RedisBackend::connect_sentinel`, `redis+sentinel://` URLs (redis-rs `sentinel`) |
//! | `redlock` | on | `RedlockBackend`, over N independent masters |
//! | `tls` | on | `rediss://` URLs and `tls_root_certificates` (rustls with the ring provider) |
//!
//! All are on by default: someone who adds dlock-redis expects every
//! deployment its documentation shows to connect. `default-features =
//! false` gives a single-server backend with the fewest crates.
//!
//! dlock never installs a process-wide rustls `CryptoProvider`. With `tls`,
//! rustls is built with ring alone and picks it by itself; if your program
//! also enables another provider (aws-lc-rs, through another crate),
//! install one with `CryptoProvider::install_default` before connecting.

#![forbid(unsafe_code)]

mod connection;
mod errors;
#[cfg(feature = "redlock")]
mod redlock;
mod scripts;
mod subscriber;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dlock_core::backend::{
    AcquireRequest, Attempt, Busy, ExtendOutcome, Grant, HostListUrl, Lease, LockBackend, OwnerToken,
    ReleaseEvents, ReleaseOutcome, async_trait, redact_url, validate_timeout,
};
pub use dlock_core::user_api::*;
pub use redis;
#[cfg(feature = "sentinel")]
use redis::AsyncConnectionConfig;
use redis::aio::ConnectionManagerConfig;
#[cfg(feature = "sentinel")]
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use tokio::time::{Instant, timeout};

#[cfg(feature = "sentinel")]
use crate::connection::SentinelMaster;
use crate::connection::{Commands, PubSubSource};
use crate::errors::from_redis;
#[cfg(feature = "redlock")]
pub use crate::redlock::{RedlockBackend, RedlockBackendBuilder};
use crate::scripts::ScriptCall;
use crate::subscriber::Subscriber;

// The defaults are associated constants (`RedisBackend::DEFAULT_...`):
// `use dlock_redis::*; use dlock_etcd::*;` must not bring two items of one
// name.
/// The longest command or connect timeout the builder accepts.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// The shortest waiter renewal the builder accepts.
const MIN_WAITER_RENEWAL: Duration = Duration::from_millis(100);

/// A lock backend on one Redis server, a Redis Cluster, or the master of a
/// Sentinel group.
///
/// Cheap to clone; clones share one multiplexed command connection
/// (concurrent commands are pipelined on it; on Cluster, one per node),
/// which reconnects by itself after a restart or failover, and one pub/sub
/// connection for waiters.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    commands: Commands,
    subscriber: Arc<Subscriber>,
    prefix: String,
    command_timeout: Duration,
    address: String,
    /// How often a waiter renews its place in line (and reads the lock, in
    /// case the message that handed it the lock was lost).
    waiter_renewal: Duration,
}

/// What one server answered to an acquire script.
pub(crate) enum NodeGrant {
    /// Taken; the server's fencing counter after the bump.
    Granted(u64),
    /// Held by another owner, for this long (if the key has a TTL).
    Busy(Option<Duration>),
}

/// Settings for [`RedisBackend`]; start with [`RedisBackend::builder`],
/// `RedisBackend::cluster_builder` or `RedisBackend::sentinel_builder`.
#[derive(Clone)]
pub struct RedisBackendBuilder {
    target: Target,
    key_prefix: String,
    command_timeout: Duration,
    connect_timeout: Duration,
    username: Option<String>,
    password: Option<String>,
    root_certificates: Option<Vec<u8>>,
    waiter_renewal: Duration,
}

/// Which kind of deployment to connect to.
#[derive(Clone)]
enum Target {
    Single(String),
    #[cfg(feature = "cluster")]
    Cluster(Vec<String>),
    #[cfg(feature = "sentinel")]
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    /// A URL that names no deployment this build can reach; the reason.
    Invalid(String),
}

/// The Redis URL forms, for messages.
const URL_FORMS: &str = "redis://[user:password@]host:port[/db] (rediss:// for TLS), \
     redis+sentinel://[user:password@]host:port,host:port/MASTER, redis+cluster://[user:password@]host:port,host:port";

impl RedisBackend {
    /// Default key prefix.
    pub const DEFAULT_KEY_PREFIX: &str = "dlock:";
    /// Default limit for one command's round trip.
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default limit for opening a connection.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default for how often a waiter renews its place in a key's line.
    pub const DEFAULT_WAITER_RENEWAL: Duration = Duration::from_secs(1);

    /// Connects with default settings to the deployment `url` names:
    ///
    /// * `redis://[user:password@]host:port[/db]`: one server
    ///   (`rediss://` for TLS, with the `tls` feature);
    /// * `redis+sentinel://[user:password@]host:port,host:port/MASTER`: the
    ///   master that these Redis Sentinels name `MASTER` (the `sentinel`
    ///   feature); the credentials are the master's;
    /// * `redis+cluster://[user:password@]host:port,host:port`: a Redis
    ///   Cluster, by any of its nodes (the `cluster` feature).
    ///
    /// A malformed URL is [`LockError::InvalidOptions`] (the password never
    /// shows in it).
    pub async fn connect(url: &str) -> Result<Self, LockError> {
        Self::builder(url).connect().await
    }

    /// Connects to a Redis Cluster through any of its nodes (`seed_urls`;
    /// the rest are discovered), with default settings (the `cluster`
    /// feature).
    ///
    /// Commands go to the master of the key's slot and follow MOVED/ASK
    /// redirections and failovers. Credentials in the first URL apply to
    /// every node.
    #[cfg(feature = "cluster")]
    pub async fn connect_cluster<I, S>(seed_urls: I) -> Result<Self, LockError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::cluster_builder(seed_urls).connect().await
    }

    /// Connects to the master that the given Redis Sentinels name for
    /// `master_name`, with default settings; after a failover it finds the
    /// new master by itself (the `sentinel` feature).
    ///
    /// Credentials in the sentinel URLs are for the sentinels; those for the
    /// master go in [`RedisBackendBuilder::credentials`].
    #[cfg(feature = "sentinel")]
    pub async fn connect_sentinel<I, S>(sentinel_urls: I, master_name: &str) -> Result<Self, LockError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::sentinel_builder(sentinel_urls, master_name).connect().await
    }

    /// Settings for a connection to the deployment `url` names (see
    /// [`connect`](Self::connect) for the forms).
    pub fn builder(url: &str) -> RedisBackendBuilder {
        let Some((scheme, _)) = url.split_once("://") else {
            return RedisBackendBuilder::new(Target::Single(url.to_owned()));
        };
        match scheme {
            "redis+sentinel" | "redis+cluster" => match HostListUrl::parse(url) {
                Ok(parsed) => Self::host_list_builder(parsed),
                Err(reason) => RedisBackendBuilder::new(Target::Invalid(reason)),
            },
            _ => RedisBackendBuilder::new(Target::Single(url.to_owned())),
        }
    }

    /// The builder for a `redis+sentinel://` or `redis+cluster://` URL.
    fn host_list_builder(url: HostListUrl) -> RedisBackendBuilder {
        #[cfg(not(all(feature = "cluster", feature = "sentinel")))]
        let missing = |feature: &str| {
            RedisBackendBuilder::new(Target::Invalid(format!(
                "{}:// needs the `{feature}` feature of dlock-redis",
                url.scheme
            )))
        };
        match url.scheme.as_str() {
            "redis+sentinel" if url.path.is_empty() => RedisBackendBuilder::new(Target::Invalid(
                "the Sentinel master name is missing (redis+sentinel://host:port,host:port/MASTER)".into(),
            )),
            #[cfg(feature = "sentinel")]
            "redis+sentinel" => {
                let sentinels = url.hosts.iter().map(|host| format!("redis://{host}"));
                let builder = Self::sentinel_builder(sentinels, &url.path);
                match &url.password {
                    Some(password) => builder.credentials(url.user.as_deref(), password),
                    None => builder,
                }
            }
            #[cfg(not(feature = "sentinel"))]
            "redis+sentinel" => missing("sentinel"),
            #[cfg(feature = "cluster")]
            _ => Self::cluster_builder(
                url.hosts
                    .iter()
                    .map(|host| format!("redis://{}{host}", url.userinfo())),
            ),
            #[cfg(not(feature = "cluster"))]
            _ => missing("cluster"),
        }
    }

    /// Settings for a connection to a Redis Cluster; see [`connect_cluster`](Self::connect_cluster).
    #[cfg(feature = "cluster")]
    pub fn cluster_builder<I, S>(seed_urls: I) -> RedisBackendBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let urls = seed_urls.into_iter().map(|url| url.as_ref().to_owned()).collect();
        RedisBackendBuilder::new(Target::Cluster(urls))
    }

    /// Settings for a connection through Redis Sentinel; see [`connect_sentinel`](Self::connect_sentinel).
    #[cfg(feature = "sentinel")]
    pub fn sentinel_builder<I, S>(sentinel_urls: I, master_name: &str) -> RedisBackendBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let sentinels = sentinel_urls
            .into_iter()
            .map(|url| url.as_ref().to_owned())
            .collect();
        RedisBackendBuilder::new(Target::Sentinel {
            sentinels,
            master: master_name.to_owned(),
        })
    }
    /// The Redis key that holds the lock for `key`.
    pub fn lock_key(&self, key: &str) -> String {
        scripts::key_name(&self.inner.prefix, key, scripts::LOCK)
    }

    /// The Redis key that holds the fencing counter for `key`.
    pub fn fence_key(&self, key: &str) -> String {
        scripts::key_name(&self.inner.prefix, key, scripts::FENCE)
    }

    /// The Redis list of the owners waiting for `key`, in arrival order.
    pub fn line_key(&self, key: &str) -> String {
        scripts::key_name(&self.inner.prefix, key, scripts::LINE)
    }

    /// The Redis hash of the places in `key`'s line (owner to the place's
    /// deadline, the TTL asked for, the waiter's attempt and its backend's
    /// channel).
    pub fn places_key(&self, key: &str) -> String {
        scripts::key_name(&self.inner.prefix, key, scripts::PLACES)
    }

    /// The pub/sub channel on which releases of `key` are announced.
    pub fn release_channel(&self, key: &str) -> String {
        scripts::key_name(&self.inner.prefix, key, scripts::RELEASED)
    }

    /// A call of `script` on the keys of `key` with these suffixes.
    fn call(&self, script: &'static redis::Script, key: &str, suffixes: &[&str]) -> ScriptCall {
        ScriptCall::new(script, &self.inner.prefix, key, suffixes)
    }

    /// A call of a script that reads the line: the lock, fence, line and
    /// places keys.
    fn line_call(&self, script: &'static redis::Script, key: &str) -> ScriptCall {
        self.call(
            script,
            key,
            &[scripts::LOCK, scripts::FENCE, scripts::LINE, scripts::PLACES],
        )
    }

    /// Releases (or, for a waiter, leaves the line) and hands the lock to
    /// the next waiter, shared by `release` and `abandon`.
    async fn release_to_next(
        &self,
        key: &str,
        owner: &OwnerToken,
        doing: &str,
    ) -> Result<ReleaseOutcome, LockError> {
        let call = self
            .line_call(&scripts::RELEASE_TO_NEXT, key)
            .arg(owner.as_str())
            .arg(millis(self.place_lease()));
        let reply: redis::Value = self.run(key, doing, &call).await?;
        Ok(match reply {
            redis::Value::BulkString(hand_over) => {
                // A waiter of this client need not wait for the message.
                self.inner.subscriber.handed_over(&hand_over);
                ReleaseOutcome::Released
            }
            redis::Value::Int(1) => ReleaseOutcome::Released,
            redis::Value::Int(0) => ReleaseOutcome::NotHeld(NotHeldReason::Expired),
            _ => ReleaseOutcome::NotHeld(NotHeldReason::OtherOwner),
        })
    }

    /// The owner-checked release of a Redlock node, whose waiters do not
    /// queue: wakes them all.
    #[cfg(feature = "redlock")]
    pub(crate) async fn release_owned(
        &self,
        key: &str,
        owner: &OwnerToken,
        doing: &str,
    ) -> Result<ReleaseOutcome, LockError> {
        let channel = self.release_channel(key);
        let call = self
            .call(&scripts::RELEASE, key, &[scripts::LOCK])
            .arg(owner.as_str())
            .arg(&channel);
        let status: i64 = self.run(key, doing, &call).await?;
        Ok(match status {
            1 => {
                // Local waiters need not wait for the message to come back.
                self.inner.subscriber.notify_local(&channel);
                ReleaseOutcome::Released
            }
            0 => ReleaseOutcome::NotHeld(NotHeldReason::Expired),
            _ => ReleaseOutcome::NotHeld(NotHeldReason::OtherOwner),
        })
    }

    /// One acquire script on this server, never queueing: the fencing
    /// token when granted, else the holder's remaining TTL (None: the key
    /// has no TTL).
    pub(crate) async fn acquire_once(
        &self,
        key: &str,
        owner: &OwnerToken,
        ttl: Duration,
    ) -> Result<NodeGrant, LockError> {
        let call = self
            .call(&scripts::ACQUIRE, key, &[scripts::LOCK, scripts::FENCE])
            .arg(owner.as_str())
            .arg(millis(ttl))
            .arg("");
        self.acquire_call(key, &call).await
    }

    /// One acquire script that joins `key`'s line when busy (`joining`) or
    /// renews the owner's place in it.
    async fn acquire_in_line(
        &self,
        key: &str,
        owner: &OwnerToken,
        ttl: Duration,
        joining: bool,
        attempt: u64,
    ) -> Result<NodeGrant, LockError> {
        let call = self
            .line_call(&scripts::ACQUIRE, key)
            .arg(owner.as_str())
            .arg(millis(ttl))
            .arg(if joining { "join" } else { "queued" })
            .arg(millis(self.place_lease()))
            .arg(self.inner.subscriber.own_channel())
            .arg(attempt);
        self.acquire_call(key, &call).await
    }

    /// How long a place in line lasts unrenewed (three renewals): a waiter
    /// that died is passed over once it runs out. Also the longest
    /// reservation a release gives the next waiter (shorter when the waiter
    /// asked for a shorter TTL): how long a waiter that died since it last
    /// renewed its place can hold up the line.
    fn place_lease(&self) -> Duration {
        self.inner.waiter_renewal * 3
    }

    /// A granted lease's token and validity.
    fn grant(&self, token: u64, ttl: Duration) -> Grant {
        Grant::new(FencingToken::new(token), ttl.saturating_sub(drift_allowance(ttl)))
    }

    async fn acquire_call(&self, key: &str, call: &ScriptCall) -> Result<NodeGrant, LockError> {
        let reply: redis::Value = self.run(key, "acquiring", call).await?;
        match reply {
            redis::Value::Int(token) if token >= 1 => Ok(NodeGrant::Granted(token.unsigned_abs())),
            // 0: the holder's key has no TTL (set by hand); rely on notifications.
            redis::Value::Int(0) => Ok(NodeGrant::Busy(None)),
            redis::Value::Int(busy) => Ok(NodeGrant::Busy(Some(Duration::from_millis(
                (-1 - busy).unsigned_abs(),
            )))),
            redis::Value::BulkString(text) if text == b"counter" => Err(self.broken_counter(key)),
            _ => Err(LockError::ForeignValue {
                key: key.to_owned(),
                found: format!(
                    "a string at {} that is not a dlock owner token",
                    self.lock_key(key)
                ),
            }),
        }
    }

    fn broken_counter(&self, key: &str) -> LockError {
        LockError::ForeignValue {
            key: key.to_owned(),
            found: format!(
                "a fencing counter at {} that is not an integer",
                self.fence_key(key)
            ),
        }
    }

    /// One owner-checked extension on this server: `None` when extended,
    /// else why not.
    pub(crate) async fn extend_once(
        &self,
        key: &str,
        owner: &OwnerToken,
        ttl: Duration,
    ) -> Result<Option<NotHeldReason>, LockError> {
        let call = self
            .call(&scripts::EXTEND, key, &[scripts::LOCK])
            .arg(owner.as_str())
            .arg(millis(ttl));
        let status: i64 = self.run(key, "extending", &call).await?;
        Ok(match status {
            1 => None,
            0 => Some(NotHeldReason::Expired),
            _ => Some(NotHeldReason::OtherOwner),
        })
    }

    /// The server's `run_id` (one server, not a Cluster or Sentinel
    /// group): two addresses of the same process answer the same one.
    #[cfg(feature = "redlock")]
    pub(crate) async fn server_run_id(&self) -> Result<Option<String>, LockError> {
        #[allow(irrefutable_let_patterns)] // without Cluster and Sentinel
        let Commands::Direct(connection) = &self.inner.commands else {
            return Ok(None);
        };
        let (mut connection, mut info) = (connection.clone(), redis::cmd("INFO"));
        let asking = info.arg("server").query_async::<String>(&mut connection);
        let info = match timeout(self.inner.command_timeout, asking).await {
            Ok(Ok(info)) => info,
            Ok(Err(error)) => return Err(from_redis(None, "reading the server's run_id", error)),
            Err(_) => {
                return Err(LockError::unavailable(
                    None,
                    format!(
                        "{} did not answer INFO within {:?}",
                        self.inner.address, self.inner.command_timeout
                    ),
                ));
            }
        };
        Ok(info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned()))
    }

    /// Raises this server's fencing counter for `key` to at least `token`.
    #[cfg(feature = "redlock")]
    pub(crate) async fn raise_fence(&self, key: &str, token: u64) -> Result<(), LockError> {
        let call = self
            .call(&scripts::RAISE_FENCE, key, &[scripts::FENCE])
            .arg(token);
        let status: i64 = self.run(key, "raising the fencing counter", &call).await?;
        if status == 1 {
            Ok(())
        } else {
            Err(self.broken_counter(key))
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        key: &str,
        doing: &str,
        call: &ScriptCall,
    ) -> Result<T, LockError> {
        match timeout(self.inner.command_timeout, self.inner.commands.invoke(call)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(from_redis(Some(key), doing, error)),
            Err(_) => Err(LockError::unavailable(
                Some(key),
                format!(
                    "{doing}: {} did not answer within {:?}",
                    self.inner.address, self.inner.command_timeout
                ),
            )),
        }
    }
}

impl RedisBackendBuilder {
    fn new(target: Target) -> Self {
        RedisBackendBuilder {
            target,
            key_prefix: RedisBackend::DEFAULT_KEY_PREFIX.to_owned(),
            command_timeout: RedisBackend::DEFAULT_COMMAND_TIMEOUT,
            connect_timeout: RedisBackend::DEFAULT_CONNECT_TIMEOUT,
            username: None,
            password: None,
            root_certificates: None,
            waiter_renewal: RedisBackend::DEFAULT_WAITER_RENEWAL,
        }
    }

    /// Prefix of every key and channel (default `dlock:`). It must not
    /// contain `{` or `}`, which Redis Cluster reads as a hash tag.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Limit for one command's round trip (default 2 s). A command that
    /// takes longer fails with [`LockError::Unavailable`].
    pub fn command_timeout(mut self, limit: Duration) -> Self {
        self.command_timeout = limit;
        self
    }

    /// Limit for opening a connection (default 5 s).
    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// How often a waiting request renews its place in the key's line on
    /// the server and reads the lock again (default 1 s, at least 100 ms).
    ///
    /// A release hands the lock to the first waiter whose place was renewed
    /// within three of these; a waiter whose process died is passed over
    /// after that. A waiter that dies within that time before its turn
    /// holds the line up for at most three of these (or its TTL, if
    /// shorter). The renewal is also how a waiter finds the lock when the
    /// message that handed it over was lost.
    pub fn waiter_renewal(mut self, every: Duration) -> Self {
        self.waiter_renewal = every;
        self
    }

    /// Username and password for the Redis servers, instead of (or
    /// overriding) those in the URL. Default: those in the URL, if any.
    pub fn credentials(mut self, username: Option<&str>, password: &str) -> Self {
        self.username = username.map(str::to_owned);
        self.password = Some(password.to_owned());
        self
    }

    /// Certificates (PEM) of the authorities to trust for `rediss://`
    /// servers, instead of the system's trust store (the default). For a
    /// private CA, such as one a test creates. Not supported with Sentinel,
    /// which uses the system's trust store.
    #[cfg(feature = "tls")]
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates = Some(pem.into());
        self
    }

    /// Connects; fails with [`LockError::InvalidOptions`] for a malformed URL
    /// or setting and [`LockError::Unavailable`] when the servers cannot be
    /// reached or refuse the credentials.
    pub async fn connect(self) -> Result<RedisBackend, LockError> {
        if self.key_prefix.contains(['{', '}']) {
            return Err(invalid(format!(
                "key prefix {:?} contains a brace; Redis Cluster reads braces as a hash tag",
                self.key_prefix
            )));
        }
        validate_timeout("command timeout", self.command_timeout, MAX_TIMEOUT)?;
        validate_timeout("connect timeout", self.connect_timeout, MAX_TIMEOUT)?;
        validate_timeout("waiter renewal", self.waiter_renewal, MAX_TIMEOUT)?;
        if self.waiter_renewal < MIN_WAITER_RENEWAL {
            return Err(invalid(format!(
                "a waiter renewal of {:?} is too short; use at least {MIN_WAITER_RENEWAL:?}",
                self.waiter_renewal
            )));
        }
        if let Target::Invalid(reason) = &self.target {
            return Err(invalid(format!("{reason}; expected {URL_FORMS}")));
        }
        if self.uses_tls() && !cfg!(feature = "tls") {
            return Err(invalid(
                "rediss:// needs the `tls` feature of dlock-redis (on by default)".into(),
            ));
        }
        let address = self.describe_target();
        let connecting = format!("connecting to {address}");
        let (commands, pubsub) = match timeout(self.connect_timeout, self.open()).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(Opening::Invalid(error))) => return Err(error),
            Ok(Err(Opening::Failed(error))) => return Err(from_redis(None, &connecting, error)),
            Err(_) => {
                let detail = format!("{connecting}: no answer within {:?}", self.connect_timeout);
                return Err(LockError::unavailable(None, detail));
            }
        };
        // Releases hand locks to this backend's waiters on its own channel.
        let own_channel = format!("{}client:{}", self.key_prefix, OwnerToken::generate()?.as_str());
        let subscriber = Subscriber::new(
            pubsub,
            self.connect_timeout.max(self.command_timeout),
            own_channel,
        );
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                commands,
                subscriber,
                prefix: self.key_prefix,
                command_timeout: self.command_timeout,
                address,
                waiter_renewal: self.waiter_renewal,
            }),
        })
    }

    /// Opens the command connection (checking that the servers answer) and
    /// describes where the pub/sub connection goes.
    async fn open(&self) -> Result<(Commands, PubSubSource), Opening> {
        #[cfg(feature = "sentinel")]
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.command_timeout));
        match &self.target {
            Target::Single(url) => {
                let client = self.client(self.node_info(url)?)?;
                let manager = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    // `RedisBackend::run` limits every call (retries of a
                    // NOSCRIPT included); a second timer per command would
                    // only cost time on the hot path.
                    .set_response_timeout(None)
                    // Fail fast while the server is down: the caller decides
                    // whether to retry (the core's backoff inside a wait, the
                    // next Redlock attempt), and a Redlock quorum must not
                    // wait on a dead node's reconnect back-off.
                    .set_number_of_retries(0);
                let connection = client
                    .get_connection_manager_with_config(manager)
                    .await
                    .map_err(Opening::Failed)?;
                Ok((Commands::Direct(connection), PubSubSource::nodes(vec![client])))
            }
            #[cfg(feature = "cluster")]
            Target::Cluster(urls) => {
                let nodes = self.urls_to_infos(urls, true)?;
                let clients = nodes
                    .iter()
                    .map(|info| self.client(info.clone()))
                    .collect::<Result<Vec<_>, _>>()?;
                #[allow(unused_mut)] // without TLS nothing changes it
                let mut cluster = redis::cluster::ClusterClient::builder(nodes)
                    .connection_timeout(self.connect_timeout)
                    .response_timeout(self.command_timeout);
                #[cfg(feature = "tls")]
                if urls.iter().any(|url| url.starts_with("rediss://")) {
                    cluster = cluster.tls(redis::TlsMode::Secure);
                }
                #[cfg(feature = "tls")]
                if let Some(pem) = &self.root_certificates {
                    cluster = cluster.certs(redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem.clone()),
                    });
                }
                let connection = cluster
                    .build()
                    .map_err(Opening::Failed)?
                    .get_async_connection()
                    .await
                    .map_err(Opening::Failed)?;
                Ok((Commands::Cluster(connection), PubSubSource::nodes(clients)))
            }
            #[cfg(feature = "sentinel")]
            Target::Sentinel { sentinels, master } => {
                if master.is_empty() {
                    return Err(Opening::Invalid(invalid(
                        "the Sentinel master name is empty; pass the name from `sentinel monitor <name> ...`"
                            .into(),
                    )));
                }
                let sentinel_nodes = self.urls_to_infos(sentinels, false)?;
                let mut redis_settings = redis::RedisConnectionInfo::default();
                if let Some(password) = &self.password {
                    redis_settings = redis_settings.set_password(password);
                    if let Some(username) = &self.username {
                        redis_settings = redis_settings.set_username(username);
                    }
                }
                if self.root_certificates.is_some() {
                    return Err(Opening::Invalid(LockError::unsupported(
                        None,
                        "custom TLS root certificates with Sentinel (use the system trust store)",
                    )));
                }
                let mut node_settings =
                    SentinelNodeConnectionInfo::default().set_redis_connection_info(redis_settings);
                if sentinels.iter().any(|url| url.starts_with("rediss://")) {
                    node_settings = node_settings.set_tls_mode(redis::TlsMode::Secure);
                }
                let client = SentinelClient::build(
                    sentinel_nodes,
                    master.clone(),
                    Some(node_settings),
                    SentinelServerType::Master,
                )
                .map_err(Opening::Failed)?;
                let master = SentinelMaster::new(client, config);
                master.connection().await.map_err(Opening::Failed)?;
                Ok((Commands::Sentinel(master.clone()), PubSubSource::Sentinel(master)))
            }
            Target::Invalid(reason) => Err(Opening::Invalid(invalid(reason.clone()))),
        }
    }

    fn uses_tls(&self) -> bool {
        let urls: Vec<&String> = match &self.target {
            Target::Single(url) => vec![url],
            #[cfg(feature = "cluster")]
            Target::Cluster(urls) => urls.iter().collect(),
            #[cfg(feature = "sentinel")]
            Target::Sentinel { sentinels, .. } => sentinels.iter().collect(),
            Target::Invalid(_) => Vec::new(),
        };
        urls.iter().any(|url| url.starts_with("rediss://"))
    }

    /// Where this builder connects, for messages (passwords redacted).
    fn describe_target(&self) -> String {
        #[cfg(any(feature = "cluster", feature = "sentinel"))]
        let list = |urls: &[String]| {
            urls.iter()
                .map(|url| redact_url(url))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &self.target {
            Target::Single(url) => redact_url(url),
            #[cfg(feature = "cluster")]
            Target::Cluster(urls) => format!("the Redis Cluster seeded by {}", list(urls)),
            #[cfg(feature = "sentinel")]
            Target::Sentinel { sentinels, master } => {
                format!("the Sentinel master `{master}` (sentinels {})", list(sentinels))
            }
            Target::Invalid(reason) => reason.clone(),
        }
    }

    /// A client for one node, trusting the builder's root certificates if any.
    fn client(&self, info: redis::ConnectionInfo) -> Result<redis::Client, Opening> {
        #[cfg(feature = "tls")]
        if let Some(pem) = &self.root_certificates {
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            };
            return redis::Client::build_with_tls(info, certificates).map_err(Opening::Failed);
        }
        redis::Client::open(info).map_err(Opening::Failed)
    }

    /// One Redis node's connection info, with the builder's credentials.
    fn node_info(&self, url: &str) -> Result<redis::ConnectionInfo, Opening> {
        let mut info = parse_url(url)?;
        if let Some(password) = &self.password {
            let mut settings = info.redis_settings().clone().set_password(password);
            if let Some(username) = &self.username {
                settings = settings.set_username(username);
            }
            info = info.set_redis_settings(settings);
        }
        Ok(info)
    }

    #[cfg(any(feature = "cluster", feature = "sentinel"))]
    fn urls_to_infos(
        &self,
        urls: &[String],
        with_credentials: bool,
    ) -> Result<Vec<redis::ConnectionInfo>, Opening> {
        if urls.is_empty() {
            return Err(Opening::Invalid(invalid(
                "no URLs given; pass at least one redis://host:port".into(),
            )));
        }
        urls.iter()
            .map(|url| {
                if with_credentials {
                    self.node_info(url)
                } else {
                    parse_url(url)
                }
            })
            .collect()
    }
}

/// Why opening failed: bad settings, or the servers.
enum Opening {
    Invalid(LockError),
    Failed(redis::RedisError),
}

fn invalid(reason: String) -> LockError {
    LockError::invalid_options(None, reason)
}

fn parse_url(url: &str) -> Result<redis::ConnectionInfo, Opening> {
    redis::IntoConnectionInfo::into_connection_info(url).map_err(|error| {
        Opening::Invalid(invalid(format!(
            "{} is not a Redis URL ({error}); expected {URL_FORMS}",
            redact_url(url)
        )))
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl LockBackend for RedisBackend {
    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt, LockError> {
        request.require_exclusive()?;
        let (key, owner, ttl) = (request.key, request.owner, request.ttl);
        if !request.queue {
            return Ok(match self.acquire_once(key, owner, ttl).await? {
                NodeGrant::Granted(token) => Attempt::Acquired(self.grant(token, ttl)),
                NodeGrant::Busy(Some(remaining)) => Attempt::Busy(Busy::new().retry_after(remaining)),
                NodeGrant::Busy(None) => Attempt::Busy(Busy::new()),
            });
        }
        let began = Instant::now();
        let subscriber = &self.inner.subscriber;
        let in_line = subscriber.is_in_line(owner.as_str());
        if in_line && request.auto_renew {
            // Handed over while this waiter waited: the lease runs from
            // before the hand-over for the reservation the server set
            // (named in the message: the releaser's settings decide it),
            // which renewal extends; no round trip needed.
            if let Some(hand_over) = subscriber.take_hand_over(owner.as_str()) {
                let reservation = hand_over.reservation.min(ttl);
                let lasts_until = hand_over.since + reservation.saturating_sub(drift_allowance(reservation));
                let validity = lasts_until.saturating_duration_since(began);
                if validity >= reservation / 2 {
                    subscriber.leave_line(owner.as_str());
                    return Ok(Attempt::Acquired(Grant::new(
                        FencingToken::new(hand_over.token),
                        validity,
                    )));
                }
            }
        }
        // While hand-overs reach this backend, record the waiter before the
        // round trip, so that a hand-over announced while it is in flight
        // still wakes it.
        let listening = subscriber.listens_on_own_channel();
        if listening {
            subscriber.join_line(owner.as_str());
        }
        let attempt = subscriber.begin_attempt(owner.as_str());
        let number = attempt.as_ref().map_or(0, |(number, _)| *number);
        let remaining = match self.acquire_in_line(key, owner, ttl, !in_line, number).await? {
            NodeGrant::Granted(token) => {
                if attempt.is_some() {
                    subscriber.leave_line(owner.as_str());
                }
                return Ok(Attempt::Acquired(self.grant(token, ttl)));
            }
            NodeGrant::Busy(remaining) => remaining,
        };
        if let (Some((number, events)), true) = (attempt, listening) {
            subscriber.found_busy(owner.as_str(), number, began);
            // Come back before the place runs out, or when the lock does.
            let renewal = self.inner.waiter_renewal;
            let renew_in = remaining.map_or(renewal, |remaining| remaining.min(renewal));
            return Ok(Attempt::Busy(Busy::new().retry_after(renew_in).wake(events)));
        }
        // Hand-overs did not reach this backend until now: listen, then
        // read the lock again at once, in case it was handed over meanwhile.
        subscriber.listen_on_own_channel(key).await?;
        subscriber.join_line(owner.as_str());
        subscriber.found_busy(owner.as_str(), number, began);
        let events = subscriber
            .events(owner.as_str())
            .unwrap_or_else(ReleaseEvents::never);
        Ok(Attempt::Busy(
            Busy::new().retry_after(Duration::ZERO).wake(events),
        ))
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<ExtendOutcome, LockError> {
        Ok(match self.extend_once(lease.key(), lease.owner(), ttl).await? {
            None => ExtendOutcome::Extended {
                validity: ttl.saturating_sub(drift_allowance(ttl)),
            },
            Some(reason) => ExtendOutcome::NotHeld(reason),
        })
    }

    async fn release(&self, lease: &Lease) -> Result<ReleaseOutcome, LockError> {
        self.release_to_next(lease.key(), lease.owner(), "releasing")
            .await
    }

    async fn abandon(&self, key: &str, owner: &OwnerToken) -> Result<(), LockError> {
        self.inner.subscriber.leave_line(owner.as_str());
        self.release_to_next(key, owner, "cleaning up").await.map(drop)
    }

    async fn subscribe(&self, key: &str) -> Result<ReleaseEvents, LockError> {
        self.inner
            .subscriber
            .subscribe(key, &self.release_channel(key))
            .await
    }

    /// Whether `key` is held, for how long, and the last fencing token
    /// handed out (never the owner's secret). One round trip.
    async fn inspect(&self, key: &str) -> Result<KeyStatus, LockError> {
        let call = self.call(&scripts::STATUS, key, &[scripts::LOCK, scripts::FENCE]);
        let (pttl, counter): (i64, i64) = self.run(key, "inspecting", &call).await?;
        let status = if pttl == -2 {
            KeyStatus::free()
        } else {
            KeyStatus::held()
        };
        let status = match u64::try_from(pttl) {
            Ok(left) => status.remaining(Duration::from_millis(left)),
            Err(_) => status,
        };
        Ok(match u64::try_from(counter) {
            Ok(token) => status.last_token(token),
            Err(_) => status,
        })
    }

    /// Deletes the lock on `key` whoever holds it, and hands it to the
    /// first waiter in line. The holder is not told until its next renewal
    /// (within a third of its TTL). Returns whether there was a lock.
    async fn force_release(&self, key: &str) -> Result<bool, LockError> {
        let channel = self.release_channel(key);
        let call = self
            .line_call(&scripts::FORCE_RELEASE, key)
            .arg(&channel)
            .arg(millis(self.place_lease()));
        let deleted: i64 = self.run(key, "force-releasing", &call).await?;
        Ok(deleted == 1)
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("address", &self.inner.address)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RedisBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackendBuilder")
            .field("target", &self.describe_target())
            .field("key_prefix", &self.key_prefix)
            .field("command_timeout", &self.command_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("waiter_renewal", &self.waiter_renewal)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field(
                "root_certificates",
                &self.root_certificates.as_ref().map(Vec::len),
            )
            .finish()
    }
}

#[cfg(all(test, feature = "cluster", feature = "sentinel"))]
mod tests {
    use super::{RedisBackend, Target};

    #[test]
    fn urls_name_their_deployment() {
        let sentinel = RedisBackend::builder("redis+sentinel://app:pw@h1:26379,h2:26379/mymaster");
        match &sentinel.target {
            Target::Sentinel { sentinels, master } => {
                assert_eq!(sentinels, &["redis://h1:26379", "redis://h2:26379"]);
                assert_eq!(master, "mymaster");
            }
            _ => panic!("not a Sentinel target"),
        }
        assert_eq!(sentinel.username.as_deref(), Some("app"));
        assert_eq!(sentinel.password.as_deref(), Some("pw"));
        match &RedisBackend::builder("redis+cluster://:pw@h1:7000,h2:7001").target {
            Target::Cluster(urls) => assert_eq!(urls, &["redis://:pw@h1:7000", "redis://:pw@h2:7001"]),
            _ => panic!("not a Cluster target"),
        }
        assert!(matches!(
            RedisBackend::builder("rediss://h:6380/1").target,
            Target::Single(_)
        ));
        for bad in [
            "redis+sentinel://h1:26379",
            "redis+cluster://h1",
            "redis+cluster://u:secret@",
        ] {
            match &RedisBackend::builder(bad).target {
                Target::Invalid(reason) => assert!(!reason.contains("secret"), "{reason}"),
                _ => panic!("{bad} was accepted"),
            }
        }
    }
}
