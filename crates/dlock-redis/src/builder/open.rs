//! Opening the connections of each deployment from the builder's settings.

use super::*;

impl RedisBackendBuilder {
    /// Opens the command connection (checking that the servers answer) and
    /// describes where the pub/sub connection goes.
    pub(super) async fn open(&self) -> Result<(Commands, PubSubSource), Opening> {
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

    pub(super) fn uses_tls(&self) -> bool {
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
    pub(super) fn describe_target(&self) -> String {
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
    pub(super) fn client(&self, info: redis::ConnectionInfo) -> Result<redis::Client, Opening> {
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
    pub(super) fn node_info(&self, url: &str) -> Result<redis::ConnectionInfo, Opening> {
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
    pub(super) fn urls_to_infos(
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
pub(super) enum Opening {
    Invalid(LockError),
    Failed(redis::RedisError),
}

pub(super) fn invalid(reason: String) -> LockError {
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
