//! `dlock`: run a command under a distributed lock, on any dlock backend.

// A command-line tool talks to the person at the terminal.
#![allow(clippy::print_stdout, clippy::print_stderr)]
#![forbid(unsafe_code)]

mod job;
mod run;
mod target;
mod watch;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dlock_core::backend::redact_url;
use dlock_core::{Leader, LockError, Locker};
use futures_util::StreamExt;

use crate::target::ACCEPTED_FORMS;

/// Exit codes of dlock itself (the command's own code is passed through).
pub(crate) mod exit {
    /// Bad usage or a malformed backend URL (sysexits `EX_USAGE`).
    pub(crate) const USAGE: u8 = 64;
    /// The backend could not be reached (sysexits `EX_UNAVAILABLE`).
    pub(crate) const UNAVAILABLE: u8 = 69;
    /// The lock was not acquired: held with `--no-wait`, or the wait ran
    /// out (sysexits `EX_TEMPFAIL`: try again later).
    pub(crate) const NOT_ACQUIRED: u8 = 75;
    /// The lock was lost while the command ran; the command was stopped.
    pub(crate) const LOST: u8 = 79;
}

const AFTER_HELP: &str = "\
Examples:
  # only one nightly report across the fleet; skip if another host runs it
  dlock run --no-wait reports/nightly -- ./make-report.sh

  # wait up to 2 minutes for the lock, on a Redis Cluster
  dlock run --backend redis+cluster://10.0.0.1:7000,10.0.0.2:7000 --wait 2m db/migrate -- ./migrate

  # on etcd, fair order among waiters; the command sees DLOCK_FENCING_TOKEN
  DLOCK_URL=etcd://10.0.0.1:2379,10.0.0.2:2379 dlock run deploy -- sh -c 'echo token $DLOCK_FENCING_TOKEN'

  # readers of the catalog run together; a plain run (the writer) waits for them
  dlock run --shared catalog -- ./read-catalog.sh

  # one active scheduler; the others wait to take over; DLOCK_TERM fences its writes
  dlock campaign scheduler host-a:8080 -- ./scheduler
  dlock leader scheduler            # leader host-a:8080 term 42, or: nobody leads
  dlock leader --watch scheduler    # one line per change

  dlock status reports/nightly
  dlock status --watch reports/nightly        # kept up to date until Ctrl-C
  dlock release --force --yes reports/nightly   # unsafe: see `dlock release --help`

Exit codes: the command's own code, or 64 usage / bad URL, 69 backend unreachable,
75 lock not acquired (held with --no-wait, or --wait ran out), 79 lock (or leadership) lost while running
(the command was sent SIGTERM, then SIGKILL after --kill-grace).";

/// Run commands under a distributed lock: only one holder of KEY at a time,
/// across every machine that uses the same backend.
#[derive(Debug, Parser)]
#[command(name = "dlock", version, after_help = AFTER_HELP)]
struct Cli {
    /// Backend URL (see `dlock run --help` for the forms).
    #[arg(
        long,
        global = true,
        env = "DLOCK_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    backend: String,
    /// Limit for connecting and for each request to the backend.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print only errors.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Print more (repeat for more).
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Acquire KEY, run COMMAND while holding it (renewed in the
    /// background), release it when COMMAND ends, and exit with its code.
    #[command(after_help = ACCEPTED_FORMS)]
    Run(run::RunArgs),
    /// Campaign to lead the election KEY with VALUE, run COMMAND while
    /// leading (DLOCK_TERM in its environment; it is stopped with exit 79
    /// if the leadership is lost), resign when COMMAND ends, and exit with
    /// its code.
    Campaign(run::CampaignArgs),
    /// Print the leader of the election KEY (its value and term), or that
    /// nobody leads; with --watch, one line per change until interrupted.
    Leader {
        /// The election's name.
        key: String,
        /// Keep printing: the current leader, then every change.
        #[arg(long)]
        watch: bool,
    },
    /// Show whether KEY is held, for how long, and its last fencing token
    /// (never the holder's secret); with --watch, keep showing it.
    Status {
        /// The lock's name.
        key: String,
        /// Keep watching until interrupted: redrawn on a terminal, one line
        /// per change (and the first state) when stdout is not a terminal.
        #[arg(long)]
        watch: bool,
    },
    /// Delete the lock on KEY whoever holds it. UNSAFE: the holder keeps
    /// running until it notices (at its next renewal, or at once on etcd)
    /// and may still write; only fencing tokens protect the resource.
    Release {
        /// The lock's name.
        key: String,
        /// Required: confirms that you mean to break someone else's lock.
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// `500ms`, `30s`, `2m`, `1h`, or a plain number of seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; use forms like 500ms, 30s, 2m, 1h"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}; use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is out of range"))
}

fn main() -> ExitCode {
    // `dlock run` starts its command through this binary (see `job.rs`).
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if arguments.first().is_some_and(|first| first == job::LAUNCH) {
        return ExitCode::from(job::launch(&arguments[1..]));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info,dlock=debug",
        (false, _) => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DLOCK_LOG").unwrap_or_else(|_| level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dlock: could not start: {error}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    ExitCode::from(runtime.block_on(dispatch(cli)))
}

async fn dispatch(cli: Cli) -> u8 {
    let locker = match target::connect(&cli.backend, cli.timeout).await {
        Ok(locker) => locker,
        Err(error) => {
            eprintln!("dlock: {}: {error}", redact_url(&cli.backend));
            if matches!(error, LockError::InvalidOptions { .. }) {
                eprintln!("{ACCEPTED_FORMS}");
            }
            return code_for(&error);
        }
    };
    match cli.command {
        Command::Run(args) => run::run(&locker, run::Wanted::Lock(args), cli.quiet).await,
        Command::Campaign(args) => run::run(&locker, run::Wanted::Leadership(args), cli.quiet).await,
        Command::Leader { key, watch: false } => leader(&locker, &key).await,
        Command::Leader { key, watch: true } => watch_leader(&locker, &key).await,
        Command::Status { key, watch: false } => status(&locker, &key).await,
        Command::Status { key, watch: true } => watch::watch_status(&locker, &key).await,
        Command::Release { key, force, yes } => force_release(&locker, &key, force, yes).await,
    }
}

/// dlock's exit code for an error.
pub(crate) fn code_for(error: &LockError) -> u8 {
    match error {
        LockError::Contended { .. } | LockError::Timeout { .. } => exit::NOT_ACQUIRED,
        LockError::Lost { .. } | LockError::NotHeld { .. } => exit::LOST,
        LockError::Unavailable { .. } => exit::UNAVAILABLE,
        _ => exit::USAGE,
    }
}

async fn status(locker: &Locker, key: &str) -> u8 {
    match locker.inspect(key).await {
        Ok(status) => {
            println!("key: {key}");
            println!("held: {}", if status.held { "yes" } else { "no" });
            if let Some(kind) = status.kind.filter(|_| status.held) {
                println!("kind: {kind}");
            }
            if let Some(holders) = status.holders.filter(|_| status.held) {
                println!("holders: {holders}");
            }
            if let Some(remaining) = status.remaining {
                println!("remaining: {:.1}s", remaining.as_secs_f64());
            }
            if let Some(token) = status.last_token {
                println!("last fencing token: {token}");
            }
            if let Some(waiting) = status.waiting {
                println!("waiting: {waiting}");
            }
            0
        }
        Err(error) => {
            eprintln!("dlock: {error}");
            code_for(&error)
        }
    }
}

/// One line for an election's state: `leader VALUE term N`, or `nobody leads`.
fn leader_line(leader: Option<&Leader>) -> String {
    match leader {
        Some(leader) => format!("leader {} term {}", leader.value, leader.term),
        None => "nobody leads".to_owned(),
    }
}

async fn leader(locker: &Locker, key: &str) -> u8 {
    match locker.election(key).leader().await {
        Ok(leader) => {
            println!("{}", leader_line(leader.as_ref()));
            0
        }
        Err(error) => {
            eprintln!("dlock: {error}");
            code_for(&error)
        }
    }
}

/// Prints the election's state, then a line per change, until Ctrl-C (exit
/// 0) or an error that will not pass (a key of another kind).
async fn watch_leader(locker: &Locker, key: &str) -> u8 {
    let mut changes = locker.election(key).observe();
    let mut stdout = std::io::stdout();
    loop {
        let item = tokio::select! {
            item = changes.next() => item,
            _ = tokio::signal::ctrl_c() => return 0,
        };
        match item {
            Some(Ok(leader)) => {
                // A reader that went away (`| head -1`) ends the watch.
                if writeln!(stdout, "{}", leader_line(leader.as_ref()))
                    .and_then(|()| stdout.flush())
                    .is_err()
                {
                    return 0;
                }
            }
            // Unreachable for a while: said once per outage; it goes on.
            Some(Err(error @ LockError::Unavailable { .. })) => eprintln!("dlock: {error}; still watching"),
            Some(Err(error)) => {
                eprintln!("dlock: {error}");
                return code_for(&error);
            }
            None => return 0,
        }
    }
}

async fn force_release(locker: &Locker, key: &str, force: bool, yes: bool) -> u8 {
    if !force {
        eprintln!(
            "dlock: `release` breaks someone else's lock and needs --force; the holder may keep writing \
             until it notices, so only use it when the holder is gone"
        );
        return exit::USAGE;
    }
    if !yes {
        if !std::io::stdin().is_terminal() {
            eprintln!("dlock: not a terminal to confirm on; add --yes to release {key:?} anyway");
            return exit::USAGE;
        }
        eprint!("Force-release {key:?}? Its holder may still be running. [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        let _ = std::io::stdin().lock().read_line(&mut answer);
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("dlock: not released");
            return exit::USAGE;
        }
    }
    match locker.force_release(key).await {
        Ok(true) => {
            eprintln!("dlock: released {key:?}");
            0
        }
        Ok(false) => {
            eprintln!("dlock: {key:?} was not held");
            0
        }
        Err(error) => {
            eprintln!("dlock: {error}");
            code_for(&error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_human_form() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "10x", "-1s", "1e999s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
