//! `dlock run`: acquire, run the command, watch for loss, release.

use std::io::{IsTerminal, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use dlock_core::{LockError, LockGuard};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, sleep, timeout};

use crate::target::Backend;
use crate::{code_for, exit, parse_duration};

/// Arguments of `dlock run`.
#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The lock's name (any text up to 512 bytes, no control characters).
    key: String,
    /// The lease's length; renewed every third of it while COMMAND runs.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ttl: Duration,
    /// Give up after waiting this long for the lock (default: no limit).
    #[arg(long, value_parser = parse_duration, conflicts_with = "no_wait")]
    wait: Option<Duration>,
    /// Do not wait: exit at once with 75 if the lock is held.
    #[arg(long)]
    no_wait: bool,
    /// When the lock is lost, how long COMMAND gets after SIGTERM before SIGKILL.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    kill_grace: Duration,
    /// The command to run, after `--`.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

pub(crate) async fn run(backend: &Backend, args: RunArgs, quiet: bool) -> u8 {
    // Taken over before anything else, so that a signal that arrives while
    // the lock is being acquired or the command is starting cannot kill dlock
    // without its clean-up.
    let mut signals = Signals::install();
    let acquired = tokio::select! {
        acquired = acquire(backend, &args, quiet) => acquired,
        received = signals.next() => {
            // A grant still in flight is given back in the background, or
            // ends with its TTL.
            eprintln!("dlock: {received:?} while acquiring {:?}; giving up", args.key);
            return u8::try_from(128 + received as i32).unwrap_or(1);
        }
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(error) => {
            if !quiet || !matches!(error, LockError::Contended { .. }) {
                eprintln!("dlock: {error}");
            }
            return code_for(&error);
        }
    };
    let token = guard.fencing_token();
    tracing::info!(key = %args.key, %token, "acquired; starting the command");
    let mut command = tokio::process::Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("DLOCK_KEY", &args.key)
        .env("DLOCK_FENCING_TOKEN", token.to_string())
        // Its own process group, so that a loss stops the command's children too.
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!("dlock: could not start {:?}: {error}", args.command[0]);
            let _ = guard.release().await;
            return 127;
        }
    };
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let outcome = supervise(&mut child, group, &guard, &args, &mut signals).await;
    match outcome {
        Outcome::Exited(status) => match guard.release().await {
            Ok(()) => exit_code(status),
            Err(error) => {
                eprintln!(
                    "dlock: the command finished, but the lock on {:?} was no longer held at the end ({error}); \
                     another holder may have run at the same time",
                    args.key
                );
                exit::LOST
            }
        },
        Outcome::Lost => exit::LOST,
    }
}

async fn acquire(backend: &Backend, args: &RunArgs, quiet: bool) -> Result<LockGuard, LockError> {
    let locker = backend.locker();
    let request = locker.lock(&args.key).ttl(args.ttl);
    if args.no_wait {
        return request.try_lock().await;
    }
    let request = match args.wait {
        Some(wait) => request.wait(wait),
        None => request,
    };
    if quiet || !std::io::stderr().is_terminal() {
        return request.await;
    }
    // On a terminal: one status line, updated in place while waiting.
    let began = Instant::now();
    let acquiring = request.into_future();
    tokio::pin!(acquiring);
    let outcome = loop {
        tokio::select! {
            outcome = &mut acquiring => break outcome,
            () = sleep(Duration::from_millis(500)) => {
                let left = match backend.inspect(&args.key).await {
                    Ok(status) => status
                        .remaining
                        .map_or_else(|| "unknown".to_owned(), |left| format!("{:.1}s", left.as_secs_f64())),
                    Err(_) => "unknown".to_owned(),
                };
                eprint!(
                    "\rdlock: waiting for {:?}: {:.1}s so far; the holder's lease has {left} left\x1b[K",
                    args.key,
                    began.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
            }
        }
    };
    if began.elapsed() >= Duration::from_millis(500) {
        eprint!("\r\x1b[K");
    }
    outcome
}

enum Outcome {
    Exited(ExitStatus),
    Lost,
}

/// Waits for the command; passes SIGINT/SIGTERM on to it; stops it when
/// the lock is lost.
async fn supervise(
    child: &mut tokio::process::Child,
    group: Option<Pid>,
    guard: &LockGuard,
    args: &RunArgs,
    signals: &mut Signals,
) -> Outcome {
    let send = |signal: Signal| {
        if let Some(group) = group {
            // An error means the group is gone already.
            let _ = killpg(group, signal);
        }
    };
    let lost = guard.lost();
    tokio::pin!(lost);
    loop {
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(status) => Outcome::Exited(status),
                    Err(error) => {
                        eprintln!("dlock: lost track of the command: {error}");
                        Outcome::Exited(ExitStatus::from_raw(1 << 8))
                    }
                };
            }
            () = &mut lost => {
                eprintln!(
                    "dlock: lost the lock on {:?} (fencing token {}); stopping the command",
                    args.key,
                    guard.fencing_token()
                );
                send(Signal::SIGTERM);
                if timeout(args.kill_grace, child.wait()).await.is_err() {
                    eprintln!("dlock: the command did not stop within {:?}; killing it", args.kill_grace);
                    send(Signal::SIGKILL);
                    let _ = child.wait().await;
                }
                return Outcome::Lost;
            }
            received = signals.next() => send(received),
        }
    }
}

/// SIGINT and SIGTERM, caught instead of ending dlock.
struct Signals {
    interrupts: Option<tokio::signal::unix::Signal>,
    terminates: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Self {
        Signals {
            interrupts: signal(SignalKind::interrupt()).ok(),
            terminates: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The next SIGINT or SIGTERM; never resolves if none could be caught.
    async fn next(&mut self) -> Signal {
        tokio::select! {
            Some(()) = async { self.interrupts.as_mut()?.recv().await } => Signal::SIGINT,
            Some(()) = async { self.terminates.as_mut()?.recv().await } => Signal::SIGTERM,
            else => std::future::pending().await,
        }
    }
}

/// The command's exit code, or 128 + the signal that ended it (as shells do).
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}
