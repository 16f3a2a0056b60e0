//! The `dlock` binary, black-box, on the real Redis and etcd servers that
//! `cargo xtask integration` starts.

use std::path::Path;
use std::process::Child;
use std::time::Duration;

use dlock_testkit::conformance::unique_key;

mod common;

use common::*;

/// Two runs append their start and end times; the intervals must not overlap.
fn two_runs_never_overlap(backend: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("log");
    let key = unique_key("cli-overlap");
    let script = format!(
        "echo \"start $(date +%s%N) $DLOCK_FENCING_TOKEN\" >> {log}; sleep 0.3; echo \"end $(date +%s%N)\" >> {log}",
        log = log.display()
    );
    let runs: Vec<Child> = (0..2)
        .map(|_| {
            spawn(dlock(
                backend,
                &["run", &key, "--wait", "20s", "--", "sh", "-c", &script],
            ))
        })
        .collect();
    for mut run in runs {
        assert_eq!(wait_exit(&mut run, Duration::from_secs(30)), 0);
    }
    let text = std::fs::read_to_string(&log).expect("read the log");
    let lines: Vec<Vec<&str>> = text.lines().map(|line| line.split(' ').collect()).collect();
    assert_eq!(lines.len(), 4, "{text}");
    // Each run wrote start then end before the other started.
    assert_eq!(
        (lines[0][0], lines[1][0], lines[2][0], lines[3][0]),
        ("start", "end", "start", "end"),
        "{text}"
    );
    let time = |line: &[&str]| line[1].parse::<u128>().expect("time");
    assert!(time(&lines[1]) <= time(&lines[2]), "overlap: {text}");
    let token = |line: &[&str]| line[2].parse::<u64>().expect("token");
    assert!(token(&lines[2]) > token(&lines[0]), "tokens: {text}");
}

fn no_wait_on_a_held_key_exits_with_75(backend: &str) {
    let key = unique_key("cli-no-wait");
    // The holder outlives any slow server by far, so a second run that
    // waited for it, instead of giving up at once, would still be running
    // when the holder is stopped below. No wall-clock bound: CI's etcd can
    // take a few hundred ms per request.
    let mut holder = spawn(dlock(backend, &["run", &key, "--", "sleep", "60"]));
    wait_until_held(backend, &key);
    let second = output(dlock(backend, &["run", "--no-wait", &key, "--", "true"]));
    assert_eq!(second.status.code(), Some(75), "{second:?}");
    assert!(
        holder.try_wait().expect("wait").is_none(),
        "the holder ended before the --no-wait run returned"
    );
    assert!(is_held(backend, &key), "the --no-wait run disturbed the holder");
    assert_eq!(terminate(&mut holder), 143);
}

fn a_lock_deleted_from_outside_stops_the_command(backend: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("finished");
    let key = unique_key("cli-deleted");
    let script = format!("sleep 20; touch {}", marker.display());
    let mut run = spawn_short_lease_run(backend, &key, &script);
    wait_until_held(backend, &key);
    let released = output(dlock(backend, &["release", "--force", "--yes", &key]));
    assert!(released.status.success(), "{released:?}");
    assert_eq!(wait_exit(&mut run, Duration::from_secs(10)), 79);
    let mut stderr = String::new();
    std::io::Read::read_to_string(run.stderr.as_mut().expect("stderr"), &mut stderr).expect("stderr");
    assert!(stderr.contains("lost the lock"), "{stderr}");
    assert!(!Path::new(&marker).exists(), "the command ran to its end");
}

fn a_signal_to_dlock_stops_the_command_and_frees_the_key(backend: &str) {
    let key = unique_key("cli-signal");
    let mut run = spawn(dlock(backend, &["run", &key, "--", "sleep", "20"]));
    wait_until_held(backend, &key);
    // sleep dies of the forwarded SIGTERM: 128 + 15, as a shell reports it.
    assert_eq!(terminate(&mut run), 143);
    assert!(!is_held(backend, &key), "the key was not freed");
}

/// Two `--shared` runs read at once (both write their start before either
/// ends); a plain run (the writer) waits until both have ended.
fn shared_runs_read_together_and_the_writer_waits(backend: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("log");
    let key = unique_key("cli-shared");
    let reader = format!(
        "echo start >> {log}; while [ $(grep -c start {log}) -lt 2 ]; do sleep 0.05; done; sleep 0.3; echo end >> {log}",
        log = log.display()
    );
    let readers: Vec<Child> = (0..2)
        .map(|_| {
            spawn(dlock(
                backend,
                &[
                    "run", "--shared", &key, "--wait", "20s", "--", "sh", "-c", &reader,
                ],
            ))
        })
        .collect();
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&log).map_or(0, |text| text.matches("start").count()) < 2 {
        assert!(
            std::time::Instant::now() < until,
            "the two readers never read together"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let writer = format!("echo write >> {log}", log = log.display());
    let mut writer = spawn(dlock(
        backend,
        &["run", &key, "--wait", "20s", "--", "sh", "-c", &writer],
    ));
    for mut reader in readers {
        assert_eq!(wait_exit(&mut reader, Duration::from_secs(30)), 0);
    }
    assert_eq!(wait_exit(&mut writer, Duration::from_secs(30)), 0);
    let text = std::fs::read_to_string(&log).expect("read the log");
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["start", "start", "end", "end", "write"],
        "{text}"
    );
}

/// Lines a `dlock leader --watch` or `dlock status --watch` (`what`)
/// prints, read on a thread.
fn watch_lines(backend: &str, what: &str, key: &str) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut command = dlock(backend, &[what, "--watch", key]);
    let mut watch = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start dlock --watch");
    let stdout = watch.stdout.take().expect("stdout is piped");
    let (lines, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    (watch, received)
}

/// A campaign runs its command while leading, with the term in its
/// environment, and `dlock leader` shows it; a second campaign waits, then
/// leads with a higher term once the first command ended; `dlock leader
/// --watch` prints the changes as they come.
fn campaigns_take_turns_and_leader_shows_them(backend: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("log");
    let key = unique_key("cli-campaign");
    let (mut watch, lines) = watch_lines(backend, "leader", &key);
    let first_line = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the watch's first line");
    assert_eq!(first_line, "nobody leads");
    let script = format!(
        "echo \"$DLOCK_LEADER_VALUE $DLOCK_TERM $DLOCK_FENCING_TOKEN\" >> {log}; sleep 1",
        log = log.display()
    );
    let mut first = spawn(dlock(
        backend,
        &["campaign", &key, "host-a:8080", "--", "sh", "-c", &script],
    ));
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(&log).map_or(0, |text| text.lines().count()) < 1 {
        assert!(std::time::Instant::now() < until, "the first campaign never led");
        std::thread::sleep(Duration::from_millis(20));
    }
    let led = std::fs::read_to_string(&log).expect("read the log");
    let term_a: u64 = led
        .split(' ')
        .nth(1)
        .and_then(|term| term.trim().parse().ok())
        .expect("a term");
    let shown = output(dlock(backend, &["leader", &key]));
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout).trim(),
        format!("leader host-a:8080 term {term_a}")
    );
    let mut second = spawn(dlock(
        backend,
        &[
            "campaign",
            &key,
            "host-b:8080",
            "--wait",
            "20s",
            "--",
            "sh",
            "-c",
            &script,
        ],
    ));
    assert_eq!(wait_exit(&mut first, Duration::from_secs(30)), 0);
    assert_eq!(wait_exit(&mut second, Duration::from_secs(30)), 0);
    let text = std::fs::read_to_string(&log).expect("read the log");
    let lines_led: Vec<Vec<&str>> = text.lines().map(|line| line.split(' ').collect()).collect();
    assert_eq!(lines_led.len(), 2, "{text}");
    assert_eq!(
        (lines_led[0][0], lines_led[1][0]),
        ("host-a:8080", "host-b:8080"),
        "{text}"
    );
    assert_eq!(
        lines_led[0][1], lines_led[0][2],
        "DLOCK_TERM is the fencing token: {text}"
    );
    let term_b: u64 = lines_led[1][1].parse().expect("a term");
    assert!(term_b > term_a, "terms must increase: {text}");
    let shown = output(dlock(backend, &["leader", &key]));
    assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "nobody leads");

    // The watch saw both leaders, in order, and nobody at the end.
    let expected_last = "nobody leads";
    let mut watched = vec![first_line];
    while watched.last().map(String::as_str) != Some(expected_last) || watched.len() < 4 {
        match lines.recv_timeout(Duration::from_secs(10)) {
            Ok(line) => watched.push(line),
            Err(_) => panic!("the watch stopped at {watched:?}"),
        }
    }
    let leaders: Vec<&String> = watched.iter().filter(|line| *line != "nobody leads").collect();
    assert_eq!(
        leaders,
        [
            &format!("leader host-a:8080 term {term_a}"),
            &format!("leader host-b:8080 term {term_b}")
        ],
        "{watched:?}"
    );
    send_signal(watch.id(), "INT");
    assert_eq!(wait_exit(&mut watch, Duration::from_secs(10)), 0);
}

/// A leader whose leadership is broken from outside has its command
/// stopped, and exits with 79.
fn a_lost_leadership_stops_the_command(backend: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("finished");
    let key = unique_key("cli-lost-leadership");
    let script = format!("sleep 20; touch {}", marker.display());
    let mut run = spawn(dlock(
        backend,
        &[
            "campaign", "--ttl", "2s", &key, "leader", "--", "sh", "-c", &script,
        ],
    ));
    let leads =
        || String::from_utf8_lossy(&output(dlock(backend, &["leader", &key])).stdout).starts_with("leader ");
    assert!(
        eventually(Duration::from_secs(20), leads),
        "the campaign never led"
    );
    let released = output(dlock(backend, &["release", "--force", "--yes", &key]));
    assert!(released.status.success(), "{released:?}");
    assert_eq!(wait_exit(&mut run, Duration::from_secs(10)), 79);
    assert!(!Path::new(&marker).exists(), "the command ran to its end");
}

/// `dlock status --watch`, piped, prints the first state and then one
/// plain line per change: a run takes the key and frees it.
fn status_watch_prints_a_line_per_change(backend: &str) {
    let key = unique_key("cli-status-watch");
    let (mut watch, lines) = watch_lines(backend, "status", &key);
    let next = || {
        lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a line from the watch")
    };
    let first = next();
    assert!(first.starts_with(&format!("key={key} held=no")), "{first}");
    assert!(first.ends_with("changes=0"), "{first}");
    let mut run = spawn(dlock(backend, &["run", &key, "--", "sleep", "1"]));
    let taken = next();
    assert!(taken.contains(" held=yes"), "{taken}");
    assert!(taken.contains("kind=\"a mutex\""), "{taken}");
    assert!(taken.contains(" last_token="), "{taken}");
    assert!(taken.ends_with("changes=1"), "{taken}");
    assert_eq!(wait_exit(&mut run, Duration::from_secs(10)), 0);
    let freed = next();
    assert!(freed.contains(" held=no"), "{freed}");
    assert!(freed.ends_with("changes=2"), "{freed}");
    let _ = watch.kill();
    let _ = watch.wait();
}

macro_rules! cli_suite {
    ($module:ident, $backend:expr) => {
        mod $module {
            use super::*;

            #[test]
            fn two_runs_never_overlap() {
                super::two_runs_never_overlap(&$backend);
            }

            #[test]
            fn no_wait_on_a_held_key_exits_with_75() {
                super::no_wait_on_a_held_key_exits_with_75(&$backend);
            }

            #[test]
            fn a_lock_deleted_from_outside_stops_the_command() {
                super::a_lock_deleted_from_outside_stops_the_command(&$backend);
            }

            #[test]
            fn shared_runs_read_together_and_the_writer_waits() {
                super::shared_runs_read_together_and_the_writer_waits(&$backend);
            }

            #[test]
            fn campaigns_take_turns_and_leader_shows_them() {
                super::campaigns_take_turns_and_leader_shows_them(&$backend);
            }

            #[test]
            fn status_watch_prints_a_line_per_change() {
                super::status_watch_prints_a_line_per_change(&$backend);
            }

            #[test]
            fn a_lost_leadership_stops_the_command() {
                super::a_lost_leadership_stops_the_command(&$backend);
            }

            #[test]
            fn a_signal_to_dlock_stops_the_command_and_frees_the_key() {
                super::a_signal_to_dlock_stops_the_command_and_frees_the_key(&$backend);
            }
        }
    };
}

cli_suite!(redis, redis_backend());
cli_suite!(etcd, etcd_backend());

#[test]
fn a_bad_url_exits_with_64_and_shows_the_forms() {
    let out = output(dlock(
        "redis+cluster://user:secret@nohost",
        &["run", "k", "--", "true"],
    ));
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("accepted backend URLs"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
}

#[test]
fn an_unreachable_server_exits_with_69() {
    let port = dlock_servers::free_port().expect("port");
    let out = output(dlock(
        &format!("redis://:secret@127.0.0.1:{port}"),
        &["--timeout", "1s", "run", "k", "--", "true"],
    ));
    assert_eq!(out.status.code(), Some(69), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unavailable") || stderr.contains("refused"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
}
