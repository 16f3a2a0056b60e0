//! Backend URLs: the one rule for showing them in messages and logs, and
//! the multi-host form the backends share
//! (`scheme://[user:password@]host:port,host:port[/path]`).

/// The URL with its password replaced by `***`, for messages and logs.
///
/// Everything between `://` and the last `@` is the user information; its
/// part after the first `:` is the password (all of it when there is no
/// `:`, since a lone secret is as sensitive). Over-redacting (an `@` in a
/// path) is preferred to showing a secret.
///
/// ```
/// use dlock_core::backend::redact_url;
///
/// assert_eq!(redact_url("redis://app:s3cret@10.0.0.1:6379/0"), "redis://app:***@10.0.0.1:6379/0");
/// assert_eq!(redact_url("etcd://root:pw@h1:2379,h2:2379"), "etcd://root:***@h1:2379,h2:2379");
/// assert_eq!(redact_url("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
/// assert!(!redact_url("redis://pa/ss@host").contains("pa/ss"));
/// ```
pub fn redact_url(url: &str) -> String {
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

/// A URL naming several hosts: `scheme://[user:password@]h1:port,h2:port[/path]`,
/// the form of `redis+sentinel://`, `redis+cluster://`, `redlock://` and
/// `etcd://` backend URLs.
///
/// ```
/// use dlock_core::backend::HostListUrl;
///
/// let url = HostListUrl::parse("redis+sentinel://app:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster")?;
/// assert_eq!(url.scheme, "redis+sentinel");
/// assert_eq!(url.user.as_deref(), Some("app"));
/// assert_eq!(url.password.as_deref(), Some("pw"));
/// assert_eq!(url.hosts, ["10.0.0.1:26379", "10.0.0.2:26379"]);
/// assert_eq!(url.path, "mymaster");
/// # Ok::<(), String>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HostListUrl {
    /// What stands before `://`.
    pub scheme: String,
    /// The user name, if the URL names one (an empty name is `None`).
    pub user: Option<String>,
    /// The password, if the URL has one.
    pub password: Option<String>,
    /// Each `host:port`, in order.
    pub hosts: Vec<String>,
    /// What follows the first `/` after the hosts (empty when nothing does).
    pub path: String,
}

impl HostListUrl {
    /// Parses `url`; the error says what is wrong (the password never
    /// appears in it).
    pub fn parse(url: &str) -> Result<HostListUrl, String> {
        let bad = |why: String| format!("{} is not a backend URL: {why}", redact_url(url));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("no scheme (scheme://host:port)".into()))?;
        let (user, password, rest) = match rest.rsplit_once('@') {
            Some((userinfo, hosts)) => {
                let (user, password) = match userinfo.split_once(':') {
                    Some((user, password)) => (user, Some(password.to_owned())),
                    None => (userinfo, None),
                };
                let user = Some(user.to_owned()).filter(|user| !user.is_empty());
                (user, password, hosts)
            }
            None => (None, None, rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let hosts: Vec<String> = hosts
            .split(',')
            .filter(|host| !host.is_empty())
            .map(str::to_owned)
            .collect();
        if hosts.is_empty() {
            return Err(bad("no host".into()));
        }
        for host in &hosts {
            let port = host
                .rsplit_once(':')
                .map(|(name, port)| (name, port.parse::<u16>()));
            if !matches!(port, Some((name, Ok(_))) if !name.is_empty()) {
                return Err(bad(format!("{host:?} is not host:port")));
            }
        }
        Ok(HostListUrl {
            scheme: scheme.to_owned(),
            user,
            password,
            hosts,
            path: path.to_owned(),
        })
    }

    /// `user:password@`, or nothing: the user information to put before a
    /// host in a single-host URL.
    pub fn userinfo(&self) -> String {
        match (&self.user, &self.password) {
            (None, None) => String::new(),
            (user, password) => format!(
                "{}:{}@",
                user.as_deref().unwrap_or_default(),
                password.as_deref().unwrap_or_default()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HostListUrl;

    #[test]
    fn bad_forms_are_refused_without_the_password() {
        for url in [
            "localhost:6379",
            "redlock://",
            "redlock://h1",
            "etcd://u:secret@h:notaport",
            "x://:1",
        ] {
            let error = HostListUrl::parse(url).expect_err(url);
            assert!(!error.contains("secret"), "{error}");
        }
        let url = HostListUrl::parse("redlock://:pw@h1:1,h2:2").expect("parses");
        assert_eq!(
            (url.user, url.password.as_deref(), url.hosts.len()),
            (None, Some("pw"), 2)
        );
    }
}
