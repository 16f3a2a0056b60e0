//! `dlock run` and the command's process group: signals passed on to the
//! whole group, the group killed after the grace, the command dying with
//! dlock, a terminal's foreground and job control (through `script`, which
//! gives the run a pseudo-terminal), and a clean exit when a signal or a
//! failed release comes at the edges of a run.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use dlock_testkit::conformance::unique_key;

mod common;

use common::*;

/// A `sh -c` script that records its process id and dlock's, then becomes
/// `sleep 30` (same process).
fn recording_sleeper(file: &std::path::Path) -> String {
    format!("echo $$ $PPID > {}; exec sleep 30", file.display())
}

#[test]
fn terminating_signals_reach_the_command_and_dlock_exits_after_it() {
    let backend = redis_backend();
    for (signal, number) in [("HUP", 1), ("QUIT", 3), ("USR1", 10), ("TERM", 15)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let pids = dir.path().join("pids");
        let key = unique_key("cli-signals");
        let mut run = spawn(dlock(
            &backend,
            &["run", &key, "--", "sh", "-c", &recording_sleeper(&pids)],
        ));
        let command = pids_from(&pids)[0];
        send_signal(run.id(), signal);
        // The command dies of the signal, and dlock reports it as a shell would.
        assert_eq!(
            wait_exit(&mut run, Duration::from_secs(10)),
            128 + number,
            "SIG{signal}"
        );
        assert!(!process_runs(command), "SIG{signal}: the command outlived dlock");
        assert!(!is_held(&backend, &key), "SIG{signal}: the key was not freed");
    }
}

#[test]
fn after_the_grace_the_whole_group_is_killed() {
    let backend = redis_backend();
    let dir = tempfile::tempdir().expect("temp dir");
    let pids = dir.path().join("pids");
    let key = unique_key("cli-grace");
    // The command's child ignores SIGTERM (so does the `sleep` it becomes);
    // the command itself dies of it at once.
    // `\$\$`: expanded by the inner shell (its own id), not the outer one.
    let child = format!("trap '' TERM; echo \\$\\$ > {}; exec sleep 60", pids.display());
    let script = format!("sh -c \"{child}\" & wait");
    let mut run = spawn_short_lease_run(&backend, &key, &script);
    let grandchild = pids_from(&pids)[0];
    wait_until_held(&backend, &key);
    let released = output(dlock(&backend, &["release", "--force", "--yes", &key]));
    assert!(released.status.success(), "{released:?}");
    assert_eq!(wait_exit(&mut run, Duration::from_secs(10)), 79);
    assert!(
        !process_runs(grandchild),
        "a process of the command's group that ignores SIGTERM outlived the lost lock"
    );
}

#[test]
fn a_killed_dlock_takes_the_command_with_it() {
    let backend = redis_backend();
    let dir = tempfile::tempdir().expect("temp dir");
    let pids = dir.path().join("pids");
    let key = unique_key("cli-killed");
    let mut run = spawn(dlock(
        &backend,
        &["run", &key, "--", "sh", "-c", &recording_sleeper(&pids)],
    ));
    let command = pids_from(&pids)[0];
    send_signal(run.id(), "KILL");
    let _ = run.wait();
    assert!(
        eventually(Duration::from_secs(5), || !process_runs(command)),
        "the command runs on without the lock after dlock was killed"
    );
}

/// `dlock run ...` under `script`, which runs it in the foreground of a
/// new pseudo-terminal; what is written to the returned child's stdin is
/// typed on that terminal.
fn on_a_terminal(backend: &str, run: &[&str]) -> std::process::Child {
    let mut line = vec![DLOCK.to_owned(), "--backend".into(), backend.to_owned()];
    line.extend(
        run.iter()
            .map(|part| format!("'{}'", part.replace('\'', "'\\''"))),
    );
    Command::new("script")
        .args(["-qec", &line.join(" "), "/dev/null"])
        .env_remove("DLOCK_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start script (util-linux)")
}

#[test]
fn a_command_that_reads_the_terminal_gets_it() {
    let backend = redis_backend();
    let key = unique_key("cli-terminal");
    let mut run = on_a_terminal(
        &backend,
        &["run", &key, "--", "sh", "-c", "read line; echo got:$line"],
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut typing = run.stdin.take().expect("stdin");
    typing.write_all(b"hello\n").expect("type");
    let exited = wait_exit(&mut run, Duration::from_secs(20));
    drop(typing);
    let mut shown = String::new();
    std::io::Read::read_to_string(run.stdout.as_mut().expect("stdout"), &mut shown).expect("stdout");
    assert!(
        shown.contains("got:hello"),
        "the command never read the terminal: {shown:?}"
    );
    assert_eq!(exited, 0);
}

#[test]
fn ctrl_z_stops_the_command_and_dlock_together() {
    let backend = redis_backend();
    let dir = tempfile::tempdir().expect("temp dir");
    let pids = dir.path().join("pids");
    let key = unique_key("cli-ctrl-z");
    let mut run = on_a_terminal(
        &backend,
        &["run", &key, "--", "sh", "-c", &recording_sleeper(&pids)],
    );
    let found = pids_from(&pids);
    let (command, dlock_pid) = (found[0], found[1]);
    let mut typing = run.stdin.take().expect("stdin");
    typing.write_all(b"\x1a").expect("type Ctrl-Z");
    typing.flush().expect("flush");
    let stopped = |pid| process_state(pid) == Some('T');
    assert!(
        eventually(Duration::from_secs(5), || stopped(command) && stopped(dlock_pid)),
        "after Ctrl-Z: command {:?}, dlock {:?}",
        process_state(command),
        process_state(dlock_pid)
    );
    // `fg`: the job (and `script`, which stopped with it) is continued.
    send_signal(run.id(), "CONT");
    send_signal(dlock_pid, "CONT");
    assert!(
        eventually(Duration::from_secs(5), || !stopped(command)
            && !stopped(dlock_pid)),
        "after SIGCONT: command {:?}, dlock {:?}",
        process_state(command),
        process_state(dlock_pid)
    );
    assert!(is_held(&backend, &key));
    send_signal(dlock_pid, "TERM");
    assert_eq!(wait_exit(&mut run, Duration::from_secs(10)), 143);
    drop(typing);
}

/// Redis line keys (`dlock:{key}:line`) on the test server.
fn line_length(key: &str) -> i64 {
    let url = redis_backend();
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split('/').next())
        .and_then(|port| port.parse().ok())
        .expect("the test server's port");
    let reply =
        dlock_servers::redis::command(port, &["LLEN", &format!("dlock:{{{key}}}:line")]).expect("LLEN");
    reply.text().parse().expect("a length")
}

#[test]
fn a_signal_while_waiting_leaves_no_place_in_line() {
    let backend = redis_backend();
    let key = unique_key("cli-waiting-signal");
    let mut holder = spawn(dlock(&backend, &["run", &key, "--", "sleep", "30"]));
    wait_until_held(&backend, &key);
    let mut waiter = spawn(dlock(&backend, &["run", &key, "--", "true"]));
    assert!(
        eventually(Duration::from_secs(10), || line_length(&key) == 1),
        "the waiter never queued"
    );
    assert_eq!(terminate(&mut waiter), 143);
    assert_eq!(line_length(&key), 0, "the waiter's place outlived it");
    assert_eq!(terminate(&mut holder), 143);
}

#[test]
fn a_release_that_fails_after_a_clean_run_keeps_the_command_code() {
    let mut server = dlock_servers::redis::start_server("cli-release-fails", &[]).expect("a redis-server");
    let backend = format!("{}/0", dlock_servers::redis::url(server.port()));
    let dir = tempfile::tempdir().expect("temp dir");
    let started = dir.path().join("started");
    let script = format!("touch {}; sleep 1; exit 3", started.display());
    let mut run = spawn(dlock(
        &backend,
        &[
            "--timeout",
            "1s",
            "run",
            "--ttl",
            "10s",
            &unique_key("cli-release"),
            "--",
            "sh",
            "-c",
            &script,
        ],
    ));
    assert!(
        eventually(Duration::from_secs(10), || started.exists()),
        "the command never started"
    );
    server.kill();
    assert_eq!(
        wait_exit(&mut run, Duration::from_secs(15)),
        3,
        "a release that could not reach the server is not a lost lock"
    );
}
