//! `dlock run`: acquire, run the command as a job (see `job.rs`), watch
//! for loss, release.

use std::io::{IsTerminal, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use dlock_core::{LockError, LockGuard, Locker};
use nix::sys::signal::Signal;
use tokio::time::{Instant, sleep, timeout};

use crate::job::{Event, Job, Signals};
use crate::{code_for, exit, parse_duration};

/// How long dlock waits for the clean-up of an acquisition it gave up on
/// (a signal arrived while it waited), before it exits anyway.
const CLEANUP_LIMIT: Duration = Duration::from_secs(5);

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
    /// Take a read lock: any number of `--shared` runs of KEY at once,
    /// while no plain run (the writer) holds it. A writer that waits goes
    /// before the `--shared` runs that come after it.
    #[arg(long)]
    shared: bool,
    /// When the lock is lost, how long COMMAND's process group gets after
    /// SIGTERM before SIGKILL.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    kill_grace: Duration,
    /// The command to run, after `--`.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

pub(crate) async fn run(locker: &Locker, args: RunArgs, quiet: bool) -> u8 {
    // Taken over before anything else, so that a signal that arrives while
    // the lock is being acquired or the command is starting cannot kill dlock
    // without its clean-up.
    let mut signals = Signals::install();
    let acquired = tokio::select! {
        acquired = acquire(locker, &args, quiet) => acquired,
        received = first_terminating(&mut signals) => {
            // Dropping the request gives back what it may hold (a grant in
            // flight, a place in line) in the background: wait for that.
            eprintln!("dlock: {received:?} while acquiring {:?}; giving up", args.key);
            let _ = timeout(CLEANUP_LIMIT, locker.wait_for_cleanup()).await;
            return u8::try_from(128 + received as i32).unwrap_or(1);
        }
    };
    let guard = match acquired {
        Ok(guard) => guard,
        Err(error) => {
            if !quiet || !matches!(error, LockError::Contended { .. }) {
                eprintln!("dlock: {error}");
            }
            let _ = timeout(CLEANUP_LIMIT, locker.wait_for_cleanup()).await;
            return code_for(&error);
        }
    };
    let token = guard.fencing_token();
    tracing::info!(key = %args.key, %token, "acquired; starting the command");
    let started = Job::spawn(&args.command, |command| {
        command
            .env("DLOCK_KEY", &args.key)
            .env("DLOCK_FENCING_TOKEN", token.to_string());
    });
    let (mut job, mut child) = match started {
        Ok(started) => started,
        Err(error) => {
            eprintln!("dlock: could not start {:?}: {error}", args.command[0]);
            let _ = guard.release().await;
            return 127;
        }
    };
    let outcome = supervise(&mut job, &mut child, &guard, &args, &mut signals).await;
    job.finish();
    match outcome {
        Outcome::Exited(status) => match guard.release().await {
            Ok(()) => exit_code(status),
            Err(error @ LockError::Unavailable { .. }) => {
                // The lock was held while the command ran (no loss was
                // seen); only giving it back failed: it runs out by its TTL.
                eprintln!(
                    "dlock: the command finished, but releasing {:?} failed ({error}); it frees itself within its TTL",
                    args.key
                );
                exit_code(status)
            }
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

/// The next signal that would end dlock. A stop request stops dlock (its
/// handler replaced the default action); the others change nothing while
/// no command runs.
async fn first_terminating(signals: &mut Signals) -> Signal {
    loop {
        match signals.next().await {
            Event::PassOn(which) => return which,
            Event::Stop => {
                let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGSTOP);
            }
            Event::Resumed | Event::Child => {}
        }
    }
}

async fn acquire(locker: &Locker, args: &RunArgs, quiet: bool) -> Result<LockGuard, LockError> {
    let request = if args.shared {
        locker.read_lock(&args.key)
    } else {
        locker.lock(&args.key)
    };
    let request = request.ttl(args.ttl);
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
                let left = match locker.inspect(&args.key).await {
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

/// Waits for the command and every process left in its group; passes
/// signals on; stops the group when the lock is lost.
async fn supervise(
    job: &mut Job,
    child: &mut tokio::process::Child,
    guard: &LockGuard,
    args: &RunArgs,
    signals: &mut Signals,
) -> Outcome {
    let lost = guard.lost();
    tokio::pin!(lost);
    let mut exited = None;
    loop {
        if exited.is_some() && !job.group_alive() {
            break;
        }
        tokio::select! {
            status = child.wait(), if exited.is_none() => {
                exited = Some(match status {
                    Ok(status) => status,
                    Err(error) => {
                        eprintln!("dlock: lost track of the command: {error}");
                        ExitStatus::from_raw(1 << 8)
                    }
                });
                if job.group_alive() {
                    tracing::info!("the command exited; waiting for the rest of its process group");
                }
            }
            () = job.group_gone(), if exited.is_some() => {}
            () = &mut lost => {
                eprintln!(
                    "dlock: lost the lock on {:?} (fencing token {}); stopping the command",
                    args.key,
                    guard.fencing_token()
                );
                stop_group(job, child, args.kill_grace).await;
                return Outcome::Lost;
            }
            event = signals.next() => job.on_event(event, signals).await,
        }
    }
    Outcome::Exited(exited.unwrap_or_else(|| ExitStatus::from_raw(1 << 8)))
}

/// SIGTERM to the whole group; SIGKILL to whatever of it is left after
/// `grace`; returns when the group is gone.
async fn stop_group(job: &Job, child: &mut tokio::process::Child, grace: Duration) {
    job.signal(Signal::SIGTERM);
    let everyone_gone = async {
        let _ = child.wait().await;
        job.group_gone().await;
    };
    if timeout(grace, everyone_gone).await.is_err() {
        eprintln!("dlock: the command's process group did not stop within {grace:?}; killing it");
        job.signal(Signal::SIGKILL);
        let _ = child.wait().await;
        job.group_gone().await;
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
