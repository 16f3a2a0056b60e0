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

/// One shown field: its title on a terminal, its name in a plain line,
/// and its value (quoted in a plain line when it has spaces).
struct Field {
    title: &'static str,
    name: &'static str,
    value: String,
}

/// The fields both views show, in order; those the key's state does not
/// have are left out.
fn fields(status: &KeyStatus, changes: u64) -> Vec<Field> {
    let shape = Shape::of(status);
    let field = |title, name, value: String| Field { title, name, value };
    let mut fields = vec![field(
        "held",
        "held",
        (if status.held { "yes" } else { "no" }).to_owned(),
    )];
    fields.extend(shape.kind.map(|kind| field("kind", "kind", kind)));
    fields.extend(
        shape
            .holders
            .map(|holders| field("holders", "holders", holders.to_string())),
    );
    fields.extend(status.remaining.filter(|_| status.held).map(|remaining| {
        field(
            "remaining lease",
            "remaining",
            format!("{:.1}s", remaining.as_secs_f64()),
        )
    }));
    fields.extend(
        status
            .last_token
            .map(|token| field("last fencing token", "last_token", token.to_string())),
    );
    fields.extend(
        status
            .waiting
            .map(|waiting| field("waiting", "waiting", waiting.to_string())),
    );
    fields.push(field("changes since start", "changes", changes.to_string()));
    fields
}

/// The terminal view: one field per line.
fn block(key: &str, status: &KeyStatus, changes: u64) -> String {
    let mut block = format!("dlock status --watch {key}   (Ctrl-C to stop)\n\n");
    for Field { title, value, .. } in fields(status, changes) {
        block.push_str(&format!("{:<19} {value}\n", format!("{title}:")));
    }
    block
}

/// The plain view: one line per change.
fn line(key: &str, status: &KeyStatus, changes: u64) -> String {
    let mut line = format!("key={key}");
    for Field { name, value, .. } in fields(status, changes) {
        if value.contains(' ') {
            line.push_str(&format!(" {name}=\"{value}\""));
        } else {
            line.push_str(&format!(" {name}={value}"));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use dlock_core::{KeyStatus, LockKind};

    use super::{block, line};

    #[test]
    fn both_views_show_the_same_fields() {
        let status = KeyStatus::held()
            .kind(LockKind::Exclusive)
            .remaining(Duration::from_millis(4_260))
            .last_token(7)
            .waiting(2);
        assert_eq!(
            line("orders/1", &status, 3),
            "key=orders/1 held=yes kind=\"a mutex\" remaining=4.3s last_token=7 waiting=2 changes=3"
        );
        assert_eq!(
            block("orders/1", &status, 3),
            "dlock status --watch orders/1   (Ctrl-C to stop)\n\n\
             held:               yes\n\
             kind:               a mutex\n\
             remaining lease:    4.3s\n\
             last fencing token: 7\n\
             waiting:            2\n\
             changes since start: 3\n"
        );
        assert_eq!(
            line("orders/1", &KeyStatus::free(), 0),
            "key=orders/1 held=no changes=0"
        );
    }
}
