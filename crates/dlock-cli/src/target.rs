//! Backend URLs: which store, where, with which credentials.

use std::time::Duration;

use dlock_core::{KeyStatus, LockError, Locker};
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

/// A parsed backend URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Redis(String),
    Sentinel {
        sentinels: Vec<String>,
        master: String,
        credentials: Option<(String, String)>,
    },
    Cluster(Vec<String>),
    Redlock(Vec<String>),
    Etcd {
        endpoints: Vec<String>,
        credentials: Option<(String, String)>,
    },
}

impl Target {
    /// Parses a backend URL; the error says what is wrong and lists the forms.
    pub(crate) fn parse(url: &str) -> Result<Target, String> {
        let bad = |why: &str| format!("{}: {why}\n{ACCEPTED_FORMS}", redact(url));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        if matches!(scheme, "redis" | "rediss") {
            return Ok(Target::Redis(url.to_owned()));
        }
        if !matches!(
            scheme,
            "redis+sentinel" | "redis+cluster" | "redlock" | "etcd" | "etcd+http" | "etcd+https"
        ) {
            return Err(bad(&format!("unknown scheme {scheme:?}")));
        }
        let (credentials, rest) = match rest.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or(("", userinfo));
                (Some((user.to_owned(), password.to_owned())), hosts)
            }
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let hosts: Vec<&str> = hosts.split(',').filter(|host| !host.is_empty()).collect();
        if hosts.is_empty() {
            return Err(bad("no host"));
        }
        for host in &hosts {
            let port = host.rsplit_once(':').map(|(_, port)| port);
            if port.is_none_or(|port| port.parse::<u16>().is_err()) {
                return Err(bad(&format!("{host:?} is not host:port")));
            }
        }
        let userinfo = credentials
            .as_ref()
            .map(|(user, password)| format!("{user}:{password}@"))
            .unwrap_or_default();
        let redis_urls = |hosts: &[&str]| -> Vec<String> {
            hosts
                .iter()
                .map(|host| format!("redis://{userinfo}{host}"))
                .collect()
        };
        match scheme {
            "redis+sentinel" => {
                if path.is_empty() {
                    return Err(bad("the master name is missing (…/MASTER)"));
                }
                Ok(Target::Sentinel {
                    sentinels: hosts.iter().map(|host| format!("redis://{host}")).collect(),
                    master: path.to_owned(),
                    credentials,
                })
            }
            "redis+cluster" => Ok(Target::Cluster(redis_urls(&hosts))),
            "redlock" => Ok(Target::Redlock(redis_urls(&hosts))),
            "etcd" | "etcd+http" | "etcd+https" => {
                let tls = if scheme == "etcd+https" { "https" } else { "http" };
                Ok(Target::Etcd {
                    endpoints: hosts.iter().map(|host| format!("{tls}://{host}")).collect(),
                    credentials,
                })
            }
            _ => Err(bad(&format!("unknown scheme {scheme:?}"))),
        }
    }

    /// Connects, with `timeout` as the limit for connecting and for each request.
    pub(crate) async fn connect(&self, timeout: Duration) -> Result<Backend, LockError> {
        Ok(match self {
            Target::Redis(url) => Backend::Redis(
                RedisBackend::builder(url)
                    .connect_timeout(timeout)
                    .command_timeout(timeout)
                    .connect()
                    .await?,
            ),
            Target::Sentinel {
                sentinels,
                master,
                credentials,
            } => {
                let mut builder = RedisBackend::sentinel_builder(sentinels, master)
                    .connect_timeout(timeout)
                    .command_timeout(timeout);
                if let Some((user, password)) = credentials {
                    builder =
                        builder.credentials(Some(user.as_str()).filter(|user| !user.is_empty()), password);
                }
                Backend::Redis(builder.connect().await?)
            }
            Target::Cluster(urls) => Backend::Redis(
                RedisBackend::cluster_builder(urls)
                    .connect_timeout(timeout)
                    .command_timeout(timeout)
                    .connect()
                    .await?,
            ),
            Target::Redlock(urls) => Backend::Redlock(
                RedlockBackend::builder(urls)
                    .connect_timeout(timeout)
                    .connect()
                    .await?,
            ),
            Target::Etcd {
                endpoints,
                credentials,
            } => {
                let mut builder = EtcdBackend::builder(endpoints)
                    .connect_timeout(timeout)
                    .request_timeout(timeout);
                if let Some((user, password)) = credentials {
                    builder = builder.user(user, password);
                }
                Backend::Etcd(builder.connect().await?)
            }
        })
    }
}

/// A connected backend of any kind.
#[derive(Debug, Clone)]
pub(crate) enum Backend {
    Redis(RedisBackend),
    Redlock(RedlockBackend),
    Etcd(EtcdBackend),
}

impl Backend {
    pub(crate) fn locker(&self) -> Locker {
        match self {
            Backend::Redis(backend) => Locker::new(backend.clone()),
            Backend::Redlock(backend) => Locker::new(backend.clone()),
            Backend::Etcd(backend) => Locker::new(backend.clone()),
        }
    }

    pub(crate) async fn inspect(&self, key: &str) -> Result<KeyStatus, LockError> {
        match self {
            Backend::Redis(backend) => backend.inspect(key).await,
            Backend::Redlock(backend) => backend.inspect(key).await,
            Backend::Etcd(backend) => backend.inspect(key).await,
        }
    }

    pub(crate) async fn force_release(&self, key: &str) -> Result<bool, LockError> {
        match self {
            Backend::Redis(backend) => backend.force_release(key).await,
            Backend::Redlock(backend) => backend.force_release(key).await,
            Backend::Etcd(backend) => backend.force_release(key).await,
        }
    }
}

/// The URL with any password replaced, for messages.
pub(crate) fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or("", |(user, _)| user);
            format!("{scheme}://{user}:***@{hosts}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_parses() {
        assert_eq!(
            Target::parse("redis://127.0.0.1:6379/0"),
            Ok(Target::Redis("redis://127.0.0.1:6379/0".into()))
        );
        assert_eq!(
            Target::parse("redis+sentinel://u:p@h1:26379,h2:26379/mymaster"),
            Ok(Target::Sentinel {
                sentinels: vec!["redis://h1:26379".into(), "redis://h2:26379".into()],
                master: "mymaster".into(),
                credentials: Some(("u".into(), "p".into())),
            })
        );
        assert_eq!(
            Target::parse("redis+cluster://h1:7000,h2:7001"),
            Ok(Target::Cluster(vec![
                "redis://h1:7000".into(),
                "redis://h2:7001".into()
            ]))
        );
        assert_eq!(
            Target::parse("redlock://:pw@h1:1,h2:2,h3:3"),
            Ok(Target::Redlock(vec![
                "redis://:pw@h1:1".into(),
                "redis://:pw@h2:2".into(),
                "redis://:pw@h3:3".into()
            ]))
        );
        assert_eq!(
            Target::parse("etcd+https://h1:2379"),
            Ok(Target::Etcd {
                endpoints: vec!["https://h1:2379".into()],
                credentials: None
            })
        );
    }

    #[test]
    fn bad_urls_show_the_forms_and_no_password() {
        for url in [
            "localhost:6379",
            "http://h:1",
            "redlock://",
            "redlock://h1",
            "redis+sentinel://h:1",
            "etcd://u:secret@h:notaport",
        ] {
            let error = Target::parse(url).expect_err(url);
            assert!(error.contains("accepted backend URLs"), "{error}");
            assert!(!error.contains("secret"), "{error}");
        }
        assert_eq!(redact("etcd://u:secret@h:1"), "etcd://u:***@h:1");
    }
}
