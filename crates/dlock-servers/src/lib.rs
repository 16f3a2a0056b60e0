//! Real servers for dlock's suites: each on free loopback ports in its own
//! temp dir, polled until ready (never slept on), and killed and reaped on
//! drop. `cargo xtask` starts the shared ones; fault tests start their own
//! so that killing them harms nobody else.
//!
//! Std only (plus `tempfile`), so that xtask stays light.

#![forbid(unsafe_code)]

pub mod etcd;
mod process;
pub mod redis;

use std::path::{Path, PathBuf};

pub use process::{ServerProcess, free_port, kill_all_servers};

/// Errors are messages for the person running the suites.
pub type Result<T = ()> = std::result::Result<T, String>;

/// The full path of `program` if it is on PATH (or in the sbin directories
/// that a non-login root shell may lack).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin"].iter().map(Into::into))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

/// Like [`find_program`], with an error that names the command that installs it.
pub fn require_program(program: &str) -> Result<PathBuf> {
    find_program(program).ok_or_else(|| {
        format!("{program} is not installed; run `cargo xtask deps` (or `cargo xtask integration`)")
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}
