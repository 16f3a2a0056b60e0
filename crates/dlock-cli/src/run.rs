//! `dlock run`: acquire, run the command as a job (see `job.rs`), watch
//! for loss, release.

use std::io::{IsTerminal, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;

use dlock_core::{Leadership, LockError, LockGuard, Locker};
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
    /// Take a read lock: any number of `--shared` runs of KEY at once,
    /// while no plain run (the writer) holds it. A writer that waits goes
    /// before the `--shared` runs that come after it.
    #[arg(long)]
    shared: bool,
    #[command(flatten)]
    job: JobArgs,
}

/// Arguments of `dlock campaign`.
#[derive(Debug, clap::Args)]
pub(crate) struct CampaignArgs {
    /// The election's name (any text up to 512 bytes, no control characters).
    key: String,
    /// The public value while this candidate leads (an address, a name):
    /// what `dlock leader KEY` prints.
    value: String,
    #[command(flatten)]
    job: JobArgs,
}

/// What `run` and `campaign` share: the lease, the wait, the command.
#[derive(Debug, clap::Args)]
pub(crate) struct JobArgs {
    /// The lease's length; renewed every third of it while COMMAND runs.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    ttl: Duration,
    /// Give up after waiting this long (default: no limit).
    #[arg(long, value_parser = parse_duration, conflicts_with = "no_wait")]
    wait: Option<Duration>,
    /// Do not wait: exit at once with 75 if the lock is held (or, for a
    /// campaign, someone else leads).
    #[arg(long)]
    no_wait: bool,
    /// When the lock (or leadership) is lost, how long COMMAND's process
    /// group gets after SIGTERM before SIGKILL.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    kill_grace: Duration,
    /// The command to run, after `--`.
    #[arg(required = true, last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// What a run holds while its command runs.
enum Held {
    Lock(LockGuard),
    Leader(Leadership),
}

impl Held {
    fn guard(&self) -> &LockGuard {
        match self {
            Held::Lock(guard) => guard,
            Held::Leader(leadership) => leadership.guard(),
        }
    }

    async fn release(self) -> Result<(), LockError> {
        match self {
            Held::Lock(guard) => guard.release().await,
            Held::Leader(leadership) => leadership.resign().await,
        }
    }
}

/// What a run asks for: a lock (`dlock run`) or the lead (`dlock campaign`).
pub(crate) enum Wanted {
    Lock(RunArgs),
    Leadership(CampaignArgs),
}

impl Wanted {
    fn key(&self) -> &str {
        match self {
            Wanted::Lock(args) => &args.key,
            Wanted::Leadership(args) => &args.key,
        }
    }

    fn job(&self) -> &JobArgs {
        match self {
            Wanted::Lock(args) => &args.job,
            Wanted::Leadership(args) => &args.job,
        }
    }
}

/// Acquires what `wanted` asks for, runs the command while holding it,
/// and gives it back; dlock's or the command's exit code.
pub(crate) async fn run(locker: &Locker, wanted: Wanted, quiet: bool) -> u8 {
    let (key, args) = (wanted.key(), wanted.job());
    // Taken over before anything else, so that a signal that arrives while
    // the lock is being acquired or the command is starting cannot kill dlock
    // without its clean-up.
    let mut signals = Signals::install();
    let acquired = tokio::select! {
        acquired = acquire(locker, &wanted, quiet) => acquired,
        received = first_terminating(&mut signals) => {
            // Dropping the request gives back what it may hold (a grant in
            // flight, a place in line) in the background: wait for that.
            eprintln!("dlock: {received:?} while acquiring {key:?}; giving up");
            let _ = timeout(CLEANUP_LIMIT, locker.wait_for_cleanup()).await;
            return u8::try_from(128 + received as i32).unwrap_or(1);
        }
    };
    let held = match acquired {
        Ok(held) => held,
        Err(error) => {
            if !quiet || !matches!(error, LockError::Contended { .. }) {
                eprintln!("dlock: {error}");
            }
            let _ = timeout(CLEANUP_LIMIT, locker.wait_for_cleanup()).await;
            return code_for(&error);
        }
    };
    let token = held.guard().fencing_token();
    tracing::info!(%key, %token, "acquired; starting the command");
    let started = Job::spawn(&args.command, |command| {
        command
            .env("DLOCK_KEY", key)
            .env("DLOCK_FENCING_TOKEN", token.to_string());
        if let Held::Leader(leadership) = &held {
            command
                .env("DLOCK_TERM", token.to_string())
                .env("DLOCK_LEADER_VALUE", leadership.value());
        }
    });
    let (mut job, mut child) = match started {
        Ok(started) => started,
        Err(error) => {
            eprintln!("dlock: could not start {:?}: {error}", args.command[0]);
            let _ = held.release().await;
            return 127;
        }
    };
    let outcome = supervise(&mut job, &mut child, held.guard(), key, args, &mut signals).await;
    job.finish();
    match outcome {
        Outcome::Exited(status) => match held.release().await {
            Ok(()) => exit_code(status),
            Err(error @ LockError::Unavailable { .. }) => {
                // The lock was held while the command ran (no loss was
                // seen); only giving it back failed: it runs out by its TTL.
                eprintln!(
                    "dlock: the command finished, but releasing {key:?} failed ({error}); it frees itself within its TTL"
                );
                exit_code(status)
            }
            Err(error) => {
                eprintln!(
                    "dlock: the command finished, but the lock on {key:?} was no longer held at the end ({error}); \
                     another holder may have run at the same time"
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

async fn acquire(locker: &Locker, wanted: &Wanted, quiet: bool) -> Result<Held, LockError> {
    let (key, args) = (wanted.key(), wanted.job());
    let acquiring: Pin<Box<dyn Future<Output = Result<Held, LockError>> + Send>> = match wanted {
        Wanted::Lock(lock) => {
            let request = if lock.shared {
                locker.read_lock(key)
            } else {
                locker.lock(key)
            };
            let request = request.ttl(args.ttl);
            match (args.no_wait, args.wait) {
                (true, _) => Box::pin(async { request.try_lock().await.map(Held::Lock) }),
                (false, Some(wait)) => Box::pin(async move { request.wait(wait).await.map(Held::Lock) }),
                (false, None) => Box::pin(async { request.await.map(Held::Lock) }),
            }
        }
        Wanted::Leadership(campaign) => {
            let request = locker.election(key).campaign(&campaign.value).ttl(args.ttl);
            match (args.no_wait, args.wait) {
                (true, _) => Box::pin(async { request.try_campaign().await.map(Held::Leader) }),
                (false, Some(wait)) => Box::pin(async move { request.wait(wait).await.map(Held::Leader) }),
                (false, None) => Box::pin(async { request.await.map(Held::Leader) }),
            }
        }
    };
    if quiet || args.no_wait || !std::io::stderr().is_terminal() {
        return acquiring.await;
    }
    // On a terminal: one status line, updated in place while waiting.
    let began = Instant::now();
    let mut acquiring = acquiring;
    let outcome = loop {
        tokio::select! {
            outcome = &mut acquiring => break outcome,
            () = sleep(Duration::from_millis(500)) => {
                let left = match locker.inspect(key).await {
                    Ok(status) => status
                        .remaining
                        .map_or_else(|| "unknown".to_owned(), |left| format!("{:.1}s", left.as_secs_f64())),
                    Err(_) => "unknown".to_owned(),
                };
                eprint!(
                    "\rdlock: waiting for {key:?}: {:.1}s so far; the holder's lease has {left} left\x1b[K",
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
    key: &str,
    args: &JobArgs,
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
                    "dlock: lost the lock on {key:?} (fencing token {}); stopping the command",
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
