//! Project automation, run as `cargo xtask <command>`.
//!
//! Commands:
//! * `ci`: format check, clippy, unit and doc tests, the integration suites, the short chaos
//!   run and the short benchmark run.
//! * `integration`: start the servers the suites need, run the suites, stop the servers.
//! * `servers`: start the servers and print their addresses, until Enter is pressed.
//! * `bench [--quick]`: start the servers, run the benchmarks (package `dlock-bench`), stop them.
//! * `chaos [--quick] [--seed N] [--only D]`: fault-injection runs (package `dlock-chaos`), which
//!   start and break their own servers.
//! * `deps`: install (as root) or name the system packages the suites need.

// xtask talks to the person at the terminal.
#![allow(clippy::print_stdout, clippy::print_stderr)]
#![forbid(unsafe_code)]

mod deps;
mod servers;

use std::process::{Command, ExitCode};
use std::time::Instant;

type Result<T = ()> = std::result::Result<T, String>;

const USAGE: &str = "usage: cargo xtask <ci | integration | servers | bench [--quick] | chaos [--quick] [--seed N] [--only D] | deps>

  ci           fmt --check, clippy -D warnings, minimal feature builds, unit + doc tests, `integration`, `chaos --quick --seed 1`,
               `bench --quick`
  integration  start the test servers, run the suites that need them (dlock-tests, dlock-cli), stop them
  servers      start the test servers, print their environment, stop them when Enter is pressed
  bench        start Redis, 5 Redlock nodes and etcd, run the benchmarks, print ratios to the raw-client floor;
               without --quick it also rewrites docs/benchmarks.md
  chaos        every deployment under every fault class, history checked; without --quick it
               also rewrites docs/reliability.md; --only single|sentinel|cluster|redlock|etcd
  deps         install the system packages the suites need (as root), or print the command";

fn main() -> ExitCode {
    // Ctrl-C, or a SIGTERM from a CI runner: stop the servers before exiting
    // (destructors do not run when a signal ends the process).
    let _ = ctrlc::set_handler(|| {
        dlock_servers::kill_all_servers();
        std::process::exit(130);
    });
    let args: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("integration") => integration(),
        Some("servers") => servers::interactive(),
        Some("bench") => bench(args.iter().any(|arg| arg == "--quick")),
        Some("chaos") => chaos(&args[1..]),
        Some("deps") => deps::ensure(deps::ALL),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_owned()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

fn ci() -> Result {
    let started = Instant::now();
    // The build itself needs protoc (etcd-client), the suites need the servers.
    deps::ensure(deps::ALL)?;
    cargo(&["fmt", "--all", "--", "--check"])?;
    // Every feature, so that the backend examples are linted too.
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ])?;
    // The smallest builds a user can choose keep compiling.
    for package in ["dlock-redis", "dlock-etcd"] {
        cargo(&["check", "--quiet", "--package", package, "--no-default-features"])?;
    }
    // The packages whose tests need servers run in `integration`.
    cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "dlock-tests",
        "--exclude",
        "dlock-cli",
        // The backend examples, and the README's doctests, which use both.
        "--features",
        "dlock-examples/redis,dlock-examples/etcd",
    ])?;
    integration()?;
    // The short form, with a fixed seed so that a failure can be replayed.
    chaos(&["--quick".to_owned(), "--seed".to_owned(), "1".to_owned()])?;
    // Every benchmark scenario for a few seconds: shows that the harness and
    // the peers still run; it asserts nothing about speed.
    bench(true)?;
    println!("xtask ci: all steps passed in {:.0?}", started.elapsed());
    Ok(())
}

fn integration() -> Result {
    deps::ensure(servers::NEEDED)?;
    let running = servers::start_all()?;
    let mut command = cargo_command(&["test", "--package", "dlock-tests", "--package", "dlock-cli"]);
    for (name, value) in running.environment() {
        command.env(name, value);
    }
    let outcome = run(command).and_then(|()| {
        // The examples, end to end, on the shared servers.
        let url = running.redis_url();
        run(cargo_command(&[
            "run",
            "--quiet",
            "--package",
            "dlock-examples",
            "--features",
            "redis",
            "--example",
            "redis",
            "--",
            &url,
        ]))?;
        let mut etcd = cargo_command(&[
            "run",
            "--quiet",
            "--package",
            "dlock-examples",
            "--features",
            "etcd",
            "--example",
            "etcd",
            "--",
        ]);
        etcd.args(running.etcd_endpoints());
        run(etcd)
    });
    if outcome.is_err() {
        running.dump_logs();
    }
    drop(running);
    outcome
}

fn chaos(args: &[String]) -> Result {
    deps::ensure(servers::NEEDED)?;
    let mut command = cargo_command(&["run", "--quiet", "--package", "dlock-chaos", "--"]);
    command.args(args);
    if !args.iter().any(|arg| arg == "--quick" || arg == "--only") {
        let document = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reliability.md");
        command.arg("--write").arg(document);
    }
    run(command)
}

fn bench(quick: bool) -> Result {
    deps::ensure(&[deps::REDIS_SERVER, deps::ETCD])?;
    let server = dlock_servers::redis::start_server("redis-bench", &[])?;
    let redlock = dlock_servers::redis::start_independent(5)?;
    let etcd = dlock_servers::etcd::EtcdCluster::start(3)?;
    let version = dlock_servers::redis::command(server.port(), &["INFO", "server"])?
        .text()
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:").map(str::to_owned))
        .unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default();
    let mut command = cargo_command(&["run", "--release", "--quiet", "--package", "dlock-bench", "--"]);
    if quick {
        command.arg("--quick");
    }
    command
        .env("DLOCK_BENCH_REDIS_URL", dlock_servers::redis::url(server.port()))
        .env(
            "DLOCK_BENCH_REDLOCK_URLS",
            redlock
                .iter()
                .map(|node| dlock_servers::redis::url(node.port()))
                .collect::<Vec<_>>()
                .join(","),
        )
        .env("DLOCK_BENCH_ETCD_ENDPOINTS", etcd.endpoints().join(","))
        .env("DLOCK_BENCH_REDIS_VERSION", version)
        .env("DLOCK_BENCH_DATE", date);
    let outcome = run(command);
    if outcome.is_err() {
        eprintln!("{}", server.log_tail());
    }
    outcome
}

fn cargo_command(args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command.args(args);
    command
}

fn cargo(args: &[&str]) -> Result {
    run(cargo_command(args))
}

fn run(mut command: Command) -> Result {
    let shown = format!("{command:?}");
    println!("xtask: running {shown}");
    let status = command
        .status()
        .map_err(|error| format!("could not start {shown}: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{shown} failed with {status}"))
    }
}
