//! Helpers shared by the `dlock` binary's test files.

#![allow(dead_code)] // each test file uses its own part

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub(crate) const DLOCK: &str = env!("CARGO_BIN_EXE_dlock");

pub(crate) fn redis_backend() -> String {
    dlock_tests::redis_url()
}

pub(crate) fn etcd_backend() -> String {
    let hosts: Vec<String> = dlock_tests::etcd_endpoints()
        .iter()
        .map(|endpoint| endpoint.trim_start_matches("http://").to_owned())
        .collect();
    format!("etcd://{}", hosts.join(","))
}

pub(crate) fn dlock(backend: &str, args: &[&str]) -> Command {
    let mut command = Command::new(DLOCK);
    command
        .arg("--backend")
        .arg(backend)
        .args(args)
        .env_remove("DLOCK_URL");
    command
}

pub(crate) fn output(mut command: Command) -> Output {
    command.output().expect("run dlock")
}

pub(crate) fn spawn(mut command: Command) -> Child {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dlock")
}

/// Polls `dlock status` until the key is held.
pub(crate) fn wait_until_held(backend: &str, key: &str) {
    let began = Instant::now();
    loop {
        let status = output(dlock(backend, &["status", key]));
        if String::from_utf8_lossy(&status.stdout).contains("held: yes") {
            return;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{key} never became held"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn is_held(backend: &str, key: &str) -> bool {
    let status = output(dlock(backend, &["status", key]));
    String::from_utf8_lossy(&status.stdout).contains("held: yes")
}

pub(crate) fn wait_exit(child: &mut Child, limit: Duration) -> i32 {
    let began = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code().unwrap_or(-1);
        }
        assert!(began.elapsed() < limit, "dlock did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM to a `dlock run` and returns its exit code.
pub(crate) fn terminate(run: &mut Child) -> i32 {
    let sent = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    wait_exit(run, Duration::from_secs(10))
}

/// Sends `signal` (a `kill` name: `HUP`, `KILL`, ...) to process `pid`.
pub(crate) fn send_signal(pid: u32, signal: &str) {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill -{signal} {pid}");
}

/// The state letter of process `pid` (`R`, `S`, `T` stopped, `Z`), or
/// `None` once it is gone.
pub(crate) fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name in parentheses may hold spaces; the state follows it.
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Whether process `pid` still runs (a zombie counts as gone).
pub(crate) fn process_runs(pid: u32) -> bool {
    process_state(pid).is_some_and(|state| state != 'Z')
}

/// Polls `condition` every 20 ms for up to `limit`.
pub(crate) fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let began = Instant::now();
    while began.elapsed() < limit {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    condition()
}

/// Reads the process ids a command wrote into `file`, once it has.
pub(crate) fn pids_from(file: &std::path::Path) -> Vec<u32> {
    let mut text = String::new();
    let written = eventually(Duration::from_secs(10), || {
        text = std::fs::read_to_string(file).unwrap_or_default();
        text.ends_with('\n')
    });
    assert!(written, "the command never wrote {}", file.display());
    text.split_whitespace()
        .map(|pid| pid.parse().expect("a process id"))
        .collect()
}

/// `dlock run --ttl 3s --kill-grace 1s KEY -- sh -c SCRIPT`, started: a
/// run whose loss the tests can cause and watch quickly.
pub(crate) fn spawn_short_lease_run(backend: &str, key: &str, script: &str) -> Child {
    spawn(dlock(
        backend,
        &[
            "run",
            "--ttl",
            "3s",
            "--kill-grace",
            "1s",
            key,
            "--",
            "sh",
            "-c",
            script,
        ],
    ))
}
