//! Turning redis-rs errors into `LockError`.

use dlock_core::LockError;

/// Maps a driver error: a wrong-type key becomes `ForeignValue`, anything
/// else `Unavailable` with the driver error as its source.
pub(crate) fn from_redis(key: Option<&str>, doing: &str, error: redis::RedisError) -> LockError {
    let text = error.to_string();
    if let Some(key) = key.filter(|_| error.code() == Some("WRONGTYPE") || text.contains("WRONGTYPE")) {
        return LockError::ForeignValue {
            key: key.to_owned(),
            found: "a value of another Redis type".into(),
        };
    }
    let hint = match error.kind() {
        redis::ErrorKind::AuthenticationFailed => "authentication failed; check the username and password",
        _ if error.is_connection_refusal() => {
            "the connection was refused; is redis-server running at that address?"
        }
        _ if error.is_timeout() => "the server did not answer in time",
        _ => "the Redis command failed",
    };
    LockError::unavailable_with(key, format!("{doing}: {hint}"), error)
}
