//! Turning etcd-client errors into `LockError`.

use dlock_core::LockError;
use etcd_client::Error;
use tonic::Code;

/// Maps a driver error to `Unavailable` (or `InvalidOptions` for a bad
/// endpoint), with a hint about the likely cause and the error as source.
pub(crate) fn from_etcd(key: Option<&str>, doing: &str, error: Error) -> LockError {
    let hint = match &error {
        Error::InvalidUri(_) | Error::InvalidArgs(_) => {
            return LockError::invalid_options(
                key,
                format!("{doing}: {error}; expected endpoints like http://host:2379"),
            );
        }
        // etcd answers a wrong password with InvalidArgument and this text.
        Error::GRpcStatus(status) if status.message().contains("authentication failed") => {
            "authentication failed; check the user and password"
        }
        Error::GRpcStatus(status) => match status.code() {
            Code::Unauthenticated => "authentication failed; check the user and password",
            Code::PermissionDenied => "permission denied; the user's role must cover the key prefix",
            Code::Unavailable | Code::DeadlineExceeded => {
                "no etcd member answered with a leader (down, or no quorum)"
            }
            _ => "the etcd request failed",
        },
        Error::TransportError(_) | Error::IoError(_) => {
            "could not reach etcd; is it running at that address?"
        }
        _ => "the etcd request failed",
    };
    LockError::unavailable_with(key, format!("{doing}: {hint}"), error)
}
