//! A guard around a server process: its own temp dir and free port, a
//! readiness poll, its log on failure, and kill + wait on every exit path.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::Result;

/// A running server; killed and reaped when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    name: String,
    program: PathBuf,
    arguments: Vec<String>,
    child: Child,
    killed: bool,
    port: u16,
    log: PathBuf,
    // Declared last: removed after the process is gone.
    dir: TempDir,
}

impl ServerProcess {
    /// Starts `program` in a fresh temp dir on a free loopback port.
    /// `arguments` gets the dir and the port and returns the command line.
    pub fn start(
        name: &str,
        program: &Path,
        arguments: impl FnOnce(&Path, u16) -> Result<Vec<String>>,
    ) -> Result<ServerProcess> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("dlock-{name}-"))
            .tempdir()
            .map_err(|error| format!("{name}: could not create a temp dir: {error}"))?;
        let port = free_port()?;
        let log = dir.path().join("server.log");
        let arguments = arguments(dir.path(), port)?;
        let child = spawn(name, program, &arguments, dir.path(), &log)?;
        Ok(ServerProcess {
            name: name.to_owned(),
            program: program.to_owned(),
            arguments,
            child,
            killed: false,
            port,
            log,
            dir,
        })
    }

    /// Kills the server (as a crash would) and starts it again with the
    /// same port, directory and arguments; the caller waits for readiness.
    pub fn restart(&mut self) -> Result {
        self.kill();
        self.child = spawn(
            &self.name,
            &self.program,
            &self.arguments,
            self.dir.path(),
            &self.log,
        )?;
        self.killed = false;
        Ok(())
    }

    /// The server's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The loopback port the server was given.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's own temp dir.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Polls `probe` until it answers true, the process exits, or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration, probe: impl Fn(u16) -> bool) -> Result {
        let deadline = Instant::now() + timeout;
        let mut pauses = Pauses::new();
        loop {
            if probe(self.port) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited with {status} before it was ready:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} was not ready within {timeout:?}:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            pauses.sleep();
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        const LINES: usize = 40;
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(LINES);
        format!(
            "--- last lines of the {} log ---\n{}",
            self.name,
            lines[start..].join("\n")
        )
    }

    /// False once [`kill`](Self::kill) was called (until a restart).
    pub fn is_running(&self) -> bool {
        !self.killed
    }

    /// Kills the server now (for fault tests); dropping it later is harmless.
    pub fn kill(&mut self) {
        self.killed = true;
        // An error means the process is already gone, which is the goal.
        let _ = self.child.kill();
        let _ = self.child.wait();
        running().retain(|pid| *pid != self.child.id());
    }
}

/// Starts one process with its output appended to `log`.
fn spawn(name: &str, program: &Path, arguments: &[String], dir: &Path, log: &Path) -> Result<Child> {
    let log_file = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|error| format!("{name}: could not open its log: {error}"))?;
    let log_copy = log_file
        .try_clone()
        .map_err(|error| format!("{name}: log: {error}"))?;
    let child = Command::new(program)
        .args(arguments)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_copy)
        .spawn()
        .map_err(|error| format!("{name}: could not start {}: {error}", program.display()))?;
    running().push(child.id());
    Ok(child)
}

/// The process ids of every server this process started and has not killed.
fn running() -> std::sync::MutexGuard<'static, Vec<u32>> {
    static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
    RUNNING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Kills every server still running, for a signal handler: when the process
/// is ended by a signal, destructors do not run, and the servers would be
/// left behind. Their temp dirs stay (they are small, in the temp folder).
pub fn kill_all_servers() {
    for pid in running().drain(..) {
        // `kill` the program: std has no way to signal a pid it does not own as a Child.
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Redis Cluster nodes also listen on their port + 10 000 (the cluster bus).
const BUS_OFFSET: u16 = 10_000;

/// A loopback port that was free a moment ago, for a server to bind; so
/// was the port [`BUS_OFFSET`] above it, which a Redis Cluster node takes
/// for its bus.
///
/// Neither is from the kernel's ephemeral range (which binding port 0 would
/// give): outgoing connections take their source ports from there, so such
/// a port can be taken by some client before the server binds it. Never the
/// same port twice in one process, as a port or as a bus port.
pub fn free_port() -> Result<u16> {
    static HANDED_OUT: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let (low, high) = ephemeral_range().unwrap_or((32_768, 60_999));
    // Below the ephemeral range with room for the bus port, or above it.
    let (first, last) = if low > 11_000 + BUS_OFFSET {
        (10_000, low - 1 - BUS_OFFSET)
    } else {
        (high.saturating_add(1), u16::MAX - BUS_OFFSET)
    };
    if first >= last {
        return Err(format!(
            "no loopback ports outside the ephemeral range {low}-{high} (with room for a cluster bus port)"
        ));
    }
    let span = u64::from(last - first) + 1;
    let mut state = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32)
        | 1;
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let free = |port: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok();
    for _ in 0..1_000 {
        // xorshift: cheap, and different in every process.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = first + u16::try_from(state % span).unwrap_or(0);
        let bus = port + BUS_OFFSET;
        if !handed_out.contains(&port) && !handed_out.contains(&bus) && free(port) && free(bus) {
            handed_out.insert(port);
            handed_out.insert(bus);
            return Ok(port);
        }
    }
    Err(format!(
        "no free loopback port pair (port and port + {BUS_OFFSET}) in {first}-{last} after 1000 tries"
    ))
}

/// The kernel's range for outgoing connections' source ports.
fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut numbers = text.split_whitespace().map(|number| number.parse::<u16>().ok());
    Some((numbers.next()??, numbers.next()??))
}

/// Growing pauses between readiness polls: 5 ms doubling up to 100 ms, so
/// that a quick server is seen at once and a slow one is not polled hard.
/// (The libraries use `dlock_core::backend::Backoff`; this crate stays
/// std-only.)
pub(crate) struct Pauses(Duration);

impl Pauses {
    pub(crate) fn new() -> Self {
        Pauses(Duration::from_millis(5))
    }

    pub(crate) fn sleep(&mut self) {
        sleep(self.0);
        self.0 = (self.0 * 2).min(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_server_is_killed_and_its_dir_removed() {
        let mut server =
            ServerProcess::start("sleeper", Path::new("/bin/sleep"), |_, _| Ok(vec!["600".into()]))
                .expect("start sleep");
        let pid = server.child.id();
        let dir = server.dir().to_path_buf();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        assert!(server.wait_ready(Duration::from_millis(50), |_| false).is_err());
        drop(server);
        // Reaped by wait(): the pid no longer names our child (a zombie would still show).
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(!status.contains("sleep"), "the sleeper is still there: {status}");
        assert!(!dir.exists(), "the temp dir was left behind");
    }

    #[test]
    fn readiness_is_polled_until_the_probe_answers() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = listener.local_addr().expect("address").port();
        let mut server =
            ServerProcess::start("sleeper", Path::new("/bin/sleep"), |_, _| Ok(vec!["600".into()]))
                .expect("start sleep");
        server
            .wait_ready(Duration::from_secs(5), |_| {
                std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok()
            })
            .expect("the probe answers");
    }

    #[test]
    fn a_server_that_dies_early_reports_its_log() {
        let mut server = ServerProcess::start("failing", Path::new("/bin/sh"), |_, _| {
            Ok(vec!["-c".into(), "echo boom >&2; exit 3".into()])
        })
        .expect("start sh");
        let error = server
            .wait_ready(Duration::from_secs(5), |_| false)
            .expect_err("it exits");
        assert!(error.contains("boom") && error.contains("exited"), "{error}");
    }
}
