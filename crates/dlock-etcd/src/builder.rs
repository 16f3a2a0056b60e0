//! Settings for an etcd backend, `etcd://` URLs, and connecting.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dlock_core::LockError;
use dlock_core::backend::{HostListUrl, OwnerToken, redact_url, validate_timeout};
#[cfg(feature = "tls")]
use etcd_client::{Certificate, TlsOptions};
use etcd_client::{Client, ConnectOptions, GetOptions};
use tokio::time::timeout;

use crate::errors::from_etcd;
use crate::members::{Failure, Members};
use crate::names::Reserved;
use crate::watches::Watches;
use crate::{EtcdBackend, Inner};

/// Settings for [`EtcdBackend`]; start with [`EtcdBackend::builder`].
#[derive(Clone)]
pub struct EtcdBackendBuilder {
    endpoints: Vec<String>,
    /// Why an `etcd://` URL could not be read, reported by `connect`.
    invalid: Option<String>,
    key_prefix: String,
    request_timeout: Duration,
    connect_timeout: Duration,
    user: Option<(String, String)>,
    root_certificates: Option<Vec<u8>>,
}

impl EtcdBackend {
    /// Connects to the cluster with default settings. `endpoints` is either
    /// the members' endpoints (`http://host:port`, `https://host:port` with
    /// the `tls` feature, or `host:port`), or a single URL naming them all:
    /// `etcd://[user:password@]h1:2379,h2:2379` (`etcd+https://` for TLS),
    /// whose user and password are used as with
    /// [`EtcdBackendBuilder::user`].
    pub async fn connect<I, S>(endpoints: I) -> Result<Self, LockError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::builder(endpoints).connect().await
    }

    /// Settings for a connection to `endpoints`.
    pub fn builder<I, S>(endpoints: I) -> EtcdBackendBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints: Vec<String> = endpoints
            .into_iter()
            .map(|endpoint| endpoint.as_ref().to_owned())
            .collect();
        let mut builder = EtcdBackendBuilder {
            endpoints,
            invalid: None,
            key_prefix: Self::DEFAULT_KEY_PREFIX.to_owned(),
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            user: None,
            root_certificates: None,
        };
        let single_url = match builder.endpoints.as_slice() {
            [single] if single.starts_with("etcd://") || single.starts_with("etcd+") => Some(single.clone()),
            _ => None,
        };
        if let Some(url) = single_url {
            match HostListUrl::parse(&url) {
                Ok(parsed) if matches!(parsed.scheme.as_str(), "etcd" | "etcd+http" | "etcd+https") => {
                    let scheme = if parsed.scheme == "etcd+https" {
                        "https"
                    } else {
                        "http"
                    };
                    builder.endpoints = parsed
                        .hosts
                        .iter()
                        .map(|host| format!("{scheme}://{host}"))
                        .collect();
                    if let Some(password) = &parsed.password {
                        builder.user = Some((parsed.user.clone().unwrap_or_default(), password.clone()));
                    }
                }
                Ok(parsed) => builder.invalid = Some(format!("unknown scheme {:?}", parsed.scheme)),
                Err(reason) => builder.invalid = Some(reason),
            }
        }
        builder
    }
}

impl EtcdBackendBuilder {
    /// Prefix of every key dlock writes (default `/dlock/`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Limit for one request (default 3 s); a request that takes longer
    /// fails with [`LockError::Unavailable`].
    pub fn request_timeout(mut self, limit: Duration) -> Self {
        self.request_timeout = limit;
        self
    }

    /// Limit for connecting, including a first read that needs a leader
    /// (default 5 s).
    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// User and password for an etcd with auth enabled (default: none).
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.user = Some((name.to_owned(), password.to_owned()));
        self
    }

    /// Certificates (PEM) of the authorities to trust for `https://`
    /// endpoints, instead of the system's trust store (the default). With
    /// the `tls` feature.
    #[cfg(feature = "tls")]
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates = Some(pem.into());
        self
    }

    /// The options for `https://` endpoints.
    #[cfg(feature = "tls")]
    fn with_tls(&self, options: ConnectOptions) -> Result<ConnectOptions, LockError> {
        let tls = match &self.root_certificates {
            Some(pem) => TlsOptions::new().ca_certificate(Certificate::from_pem(pem)),
            None => TlsOptions::new().with_native_roots(),
        };
        Ok(options.with_tls(tls))
    }

    #[cfg(not(feature = "tls"))]
    fn with_tls(&self, _options: ConnectOptions) -> Result<ConnectOptions, LockError> {
        Err(LockError::invalid_options(
            None,
            "https:// endpoints need the `tls` feature of dlock-etcd (on by default)",
        ))
    }

    /// Connects and checks that the cluster answers with a leader. Fails
    /// with [`LockError::InvalidOptions`] for malformed endpoints or
    /// settings, and [`LockError::Unavailable`] when no member answers
    /// within the connect timeout.
    pub async fn connect(self) -> Result<EtcdBackend, LockError> {
        let invalid = |reason: String| LockError::invalid_options(None, reason);
        if let Some(reason) = &self.invalid {
            return Err(invalid(format!(
                "{reason}; expected etcd://[user:password@]host:port,host:port or http://host:port endpoints"
            )));
        }
        if self.endpoints.is_empty() {
            return Err(invalid(
                "no etcd endpoints given; pass http://host:2379 or host:2379".into(),
            ));
        }
        for endpoint in &self.endpoints {
            check_endpoint(endpoint).map_err(|problem| {
                invalid(format!(
                    "{:?} is not an etcd endpoint ({problem}); expected http://host:port or host:port",
                    redact_url(endpoint)
                ))
            })?;
        }
        let longest = Duration::from_secs(300);
        validate_timeout("request timeout", self.request_timeout, longest)?;
        validate_timeout("connect timeout", self.connect_timeout, longest)?;
        let endpoints = self.endpoints.join(", ");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            // etcd's auth tokens expire when idle; a long-lived backend must renew them.
            .with_auto_token_refresh(true);
        if let Some((name, password)) = &self.user {
            options = options.with_user(name.clone(), password.clone());
        }
        if self
            .endpoints
            .iter()
            .any(|endpoint| endpoint.starts_with("https://"))
        {
            options = self.with_tls(options)?;
        }
        let connecting = format!("connecting to etcd at {endpoints}");
        // One client per member (see `members.rs`). Without auth they
        // connect lazily; with auth, a member that is down now is left out.
        let mut clients = Vec::new();
        let mut last_error = None;
        for endpoint in &self.endpoints {
            match timeout(
                self.connect_timeout,
                Client::connect([endpoint], Some(options.clone())),
            )
            .await
            {
                Ok(Ok(client)) => clients.push(client),
                Ok(Err(error)) => last_error = Some(error),
                Err(_) => {}
            }
        }
        if clients.is_empty() {
            return Err(match last_error {
                Some(error) => from_etcd(None, &connecting, error),
                None => LockError::unavailable(
                    None,
                    format!(
                        "{connecting}: no member answered within {:?}",
                        self.connect_timeout
                    ),
                ),
            });
        }
        let members = Arc::new(Members::new(clients));
        // At most a second: this only saves a hop per request.
        members
            .prefer_leader(self.connect_timeout.min(Duration::from_secs(1)))
            .await;
        // A linearizable read: answers only with a leader and quorum.
        let probe = members
            .call(self.connect_timeout, |mut client| {
                let prefix = self.key_prefix.clone();
                async move {
                    client
                        .get(prefix, Some(GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await;
        match probe {
            Ok(_) => {}
            Err(Failure::Refused(error)) | Err(Failure::NoAnswer(Some(error))) => {
                return Err(from_etcd(None, &connecting, error));
            }
            Err(Failure::NoAnswer(None)) => {
                return Err(LockError::unavailable(
                    None,
                    format!(
                        "{connecting}: no answer with a leader within {:?}",
                        self.connect_timeout
                    ),
                ));
            }
        }
        let watches = Watches::start(Arc::clone(&members));
        Ok(EtcdBackend {
            inner: Arc::new(Inner {
                members,
                watches,
                prefix: self.key_prefix,
                request_timeout: self.request_timeout,
                endpoints,
                sessions: tokio::sync::Mutex::new(HashMap::new()),
                client_id: OwnerToken::generate()?.as_str().to_owned(),
                reserved: Reserved::default(),
                waiting: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// `http://host:port`, `https://host:port` or `host:port`.
fn check_endpoint(endpoint: &str) -> Result<(), &'static str> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    if rest.contains("://") {
        return Err("unknown scheme");
    }
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or("no port")?;
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err("bad host");
    }
    port.parse::<u16>().map(drop).map_err(|_| "bad port")
}

impl fmt::Debug for EtcdBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackendBuilder")
            .field("endpoints", &self.endpoints)
            .field("key_prefix", &self.key_prefix)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field(
                "root_certificates",
                &self.root_certificates.as_ref().map(Vec::len),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_etcd_url_names_every_member() {
        let builder = super::EtcdBackend::builder(["etcd+https://root:pw@h1:2379,h2:2379"]);
        assert_eq!(builder.endpoints, ["https://h1:2379", "https://h2:2379"]);
        assert_eq!(builder.user, Some(("root".to_owned(), "pw".to_owned())));
        let plain = super::EtcdBackend::builder(["etcd://h1:2379"]);
        assert_eq!(plain.endpoints, ["http://h1:2379"]);
        assert_eq!(plain.user, None);
        assert!(
            super::EtcdBackend::builder(["etcd://u:secret@h1"])
                .invalid
                .is_some_and(|why| !why.contains("secret"))
        );
        assert!(
            super::EtcdBackend::builder(["http://h1:2379", "h2:2379"])
                .invalid
                .is_none()
        );
    }

    use super::check_endpoint;

    #[test]
    fn endpoints_are_checked() {
        for good in [
            "http://127.0.0.1:2379",
            "127.0.0.1:2379",
            "https://etcd.example:2379/",
        ] {
            assert!(check_endpoint(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "not a url",
            "redis://h:1",
            "http://h",
            "h:port",
            "http://:2379",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
