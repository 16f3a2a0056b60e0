//! Settings and connecting: `RedisBackendBuilder`, the Redis URL forms,
//! and opening the connections of each deployment.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dlock_core::LockError;
use dlock_core::backend::{HostListUrl, OwnerToken, redact_url, validate_timeout};
#[cfg(feature = "sentinel")]
use redis::AsyncConnectionConfig;
use redis::aio::ConnectionManagerConfig;
#[cfg(feature = "sentinel")]
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use tokio::time::timeout;

#[cfg(feature = "sentinel")]
use crate::connection::SentinelMaster;
use crate::connection::{Commands, PubSubSource};
use crate::errors::from_redis;
use crate::subscriber::Subscriber;
use crate::{Inner, RedisBackend};

mod open;

use open::{Opening, invalid};

/// The longest command or connect timeout the builder accepts.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// The shortest waiter renewal the builder accepts.
const MIN_WAITER_RENEWAL: Duration = Duration::from_millis(100);

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
