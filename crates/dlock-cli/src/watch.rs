//! `dlock status --watch KEY`: the key's state, redrawn on a terminal, or
//! one plain line per change when stdout is a pipe or a file.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use dlock_core::{KeyStatus, LockError, Locker};

use crate::code_for;

/// How often the state is read. A status view polls: it holds no lock and
/// waits for none, and the holder's remaining lease changes continuously.
const EVERY: Duration = Duration::from_millis(250);

/// What a change is made of: everything but the remaining lease, which
/// shrinks on every read.
#[derive(PartialEq, Eq, Clone)]
struct Shape {
    held: bool,
    kind: Option<String>,
    holders: Option<usize>,
    last_token: Option<u64>,
    waiting: Option<usize>,
}

impl Shape {
    fn of(status: &KeyStatus) -> Shape {
        Shape {
            held: status.held,
            kind: status.kind.filter(|_| status.held).map(|kind| kind.to_string()),
            holders: status.holders.filter(|_| status.held),
            last_token: status.last_token,
            waiting: status.waiting,
        }
    }
}

/// Watches `key` until Ctrl-C (exit 0), a reader that went away (exit 0),
/// or an error that will not pass; an unreachable backend is said once per
/// outage and watched through.
pub(crate) async fn watch_status(locker: &Locker, key: &str) -> u8 {
    let on_terminal = std::io::stdout().is_terminal();
    let mut stdout = std::io::stdout();
    let mut last: Option<Shape> = None;
    let mut changes = 0u64;
    let mut unreachable = false;
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = tokio::signal::ctrl_c() => return 0,
        }
        let status = match locker.inspect(key).await {
            Ok(status) => {
                unreachable = false;
                status
            }
            Err(error @ LockError::Unavailable { .. }) => {
                if !unreachable {
                    eprintln!("dlock: {error}; still watching");
                }
                unreachable = true;
                continue;
            }
            Err(error) => {
                eprintln!("dlock: {error}");
                return code_for(&error);
            }
        };
        let shape = Shape::of(&status);
        let changed = last.as_ref().is_some_and(|last| *last != shape);
        if changed {
            changes += 1;
        }
        let written = if on_terminal {
            write!(stdout, "\x1b[H\x1b[2J{}", block(key, &status, changes))
        } else if last.is_none() || changed {
            writeln!(stdout, "{}", line(key, &status, changes))
        } else {
            Ok(())
        };
        // A reader that went away (`| head -3`) ends the watch.
        if written.and_then(|()| stdout.flush()).is_err() {
            return 0;
        }
        last = Some(shape);
    }
}

/// The terminal view: one field per line.
fn block(key: &str, status: &KeyStatus, changes: u64) -> String {
    let mut block = format!("dlock status --watch {key}   (Ctrl-C to stop)\n\n");
    let shape = Shape::of(status);
    block.push_str(&format!(
        "held:               {}\n",
        if status.held { "yes" } else { "no" }
    ));
    if let Some(kind) = &shape.kind {
        block.push_str(&format!("kind:               {kind}\n"));
    }
    if let Some(holders) = shape.holders {
        block.push_str(&format!("holders:            {holders}\n"));
    }
    if let Some(remaining) = status.remaining.filter(|_| status.held) {
        block.push_str(&format!("remaining lease:    {:.1}s\n", remaining.as_secs_f64()));
    }
    if let Some(token) = status.last_token {
        block.push_str(&format!("last fencing token: {token}\n"));
    }
    if let Some(waiting) = status.waiting {
        block.push_str(&format!("waiting:            {waiting}\n"));
    }
    block.push_str(&format!("changes since start: {changes}\n"));
    block
}

/// The plain view: one line per change.
fn line(key: &str, status: &KeyStatus, changes: u64) -> String {
    let shape = Shape::of(status);
    let mut line = format!("key={key} held={}", if status.held { "yes" } else { "no" });
    if let Some(kind) = &shape.kind {
        line.push_str(&format!(" kind=\"{kind}\""));
    }
    if let Some(holders) = shape.holders {
        line.push_str(&format!(" holders={holders}"));
    }
    if let Some(remaining) = status.remaining.filter(|_| status.held) {
        line.push_str(&format!(" remaining={:.1}s", remaining.as_secs_f64()));
    }
    if let Some(token) = status.last_token {
        line.push_str(&format!(" last_token={token}"));
    }
    if let Some(waiting) = status.waiting {
        line.push_str(&format!(" waiting={waiting}"));
    }
    line.push_str(&format!(" changes={changes}"));
    line
}
