//! Project automation, run as `cargo xtask <task>`; `cargo xtask --help`
//! lists the tasks.

// xtask talks to the person at the terminal.
#![allow(clippy::print_stdout, clippy::print_stderr)]
#![forbid(unsafe_code)]

mod deps;
mod servers;

use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{Parser, Subcommand};

type Result<T = ()> = std::result::Result<T, String>;

/// Project automation: the CI run, the test servers, benchmarks and chaos runs.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// fmt --check, clippy -D warnings, minimal feature builds, unit and doc
    /// tests, `integration`, `chaos --quick --seed 1`, `bench --quick`.
    Ci,
    /// Start the test servers, run the suites that need them (dlock-tests,
    /// dlock-cli) and the backend examples, stop the servers.
    Integration,
    /// Start the test servers, print their environment, stop them when
    /// Enter is pressed.
    Servers,
    /// Start Redis, 5 Redlock nodes and etcd and run the benchmarks
    /// (`dlock-bench`); ratios to the raw-client floor. With no scenario, all
    /// of them, and without --quick docs/benchmarks.md is rewritten. `cargo
    /// xtask bench --help` lists the scenarios and profiles.
    #[command(disable_help_flag = true)]
    Bench {
        /// Passed to dlock-bench: `--quick`, a scenario, a profile; and
        /// xtask's own `--with-metrics` (build with dlock's `metrics`
        /// feature, no recorder installed; never rewrites docs/).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Every deployment under every fault class, history checked
    /// (`dlock-chaos`, which starts and breaks its own servers); without
    /// --quick or --only, docs/reliability.md is rewritten. `cargo xtask
    /// chaos --help` lists its options.
    #[command(disable_help_flag = true)]
    Chaos {
        /// Passed to dlock-chaos: `--quick`, `--seed N`, `--only DEPLOYMENT`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install the system packages the suites need (as root), or print the
    /// command.
    Deps,
}

fn main() -> ExitCode {
    // Ctrl-C, or a SIGTERM from a CI runner: stop the servers before exiting
    // (destructors do not run when a signal ends the process).
    let _ = ctrlc::set_handler(|| {
        dlock_servers::kill_all_servers();
        std::process::exit(130);
    });
    let outcome = match Cli::parse().task {
        Task::Ci => ci(),
        Task::Integration => integration(),
        Task::Servers => servers::interactive(),
        Task::Bench { args } => bench(&args),
        Task::Chaos { args } => chaos(&args),
        Task::Deps => deps::ensure(deps::ALL),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `args` ask for help (then nothing is started).
fn asks_for_help(args: &[String]) -> bool {
    args.iter()
        .any(|arg| arg == "--help" || arg == "-h" || arg == "help")
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
    // dlock-core without its `metrics` feature (the workspace build above
    // turns it on): the empty recording functions stay warning-free.
    cargo(&[
        "clippy",
        "--quiet",
        "--package",
        "dlock-core",
        "--lib",
        "--",
        "-D",
        "warnings",
    ])?;
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
    bench(&["--quick".to_owned()])?;
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
    if asks_for_help(args) {
        return run(package_command("dlock-chaos", &[], &["--help"]));
    }
    deps::ensure(servers::NEEDED)?;
    let mut command = package_command::<&str>("dlock-chaos", &[], &[]);
    command.args(args);
    if !args.iter().any(|arg| arg == "--quick" || arg == "--only") {
        command.arg("--write").arg(docs().join("reliability.md"));
    }
    run(command)
}

/// Scenarios and profiles of dlock-bench; with none of them, `all`.
const BENCH_COMMANDS: [&str; 9] = [
    "all",
    "uncontended",
    "throughput",
    "handoff",
    "read-write",
    "etcd",
    "watchdog",
    "election",
    "profile",
];

fn bench(args: &[String]) -> Result {
    if asks_for_help(args) {
        return run(package_command("dlock-bench", &[], args));
    }
    deps::ensure(&[deps::REDIS_SERVER, deps::ETCD])?;
    let server = dlock_servers::redis::start_server("redis-bench", &[])?;
    let redlock = dlock_servers::redis::start_independent(5)?;
    let etcd = dlock_servers::etcd::EtcdCluster::start(3)?;
    let redlock_urls: Vec<String> = redlock
        .iter()
        .map(|node| dlock_servers::redis::url(node.port()))
        .collect();
    // `--with-metrics` is xtask's: it builds the benchmarks with dlock's
    // `metrics` feature on (and no recorder installed), to compare its cost.
    let with_metrics = args.iter().any(|arg| arg == "--with-metrics");
    let args: Vec<&String> = args.iter().filter(|arg| *arg != "--with-metrics").collect();
    let build: &[&str] = if with_metrics {
        &["--release", "--features", "metrics"]
    } else {
        &["--release"]
    };
    let mut command = package_command::<&str>("dlock-bench", build, &[]);
    command
        .arg("--redis-url")
        .arg(dlock_servers::redis::url(server.port()))
        .arg("--redlock-urls")
        .arg(redlock_urls.join(","))
        .arg("--etcd-endpoints")
        .arg(etcd.endpoints().join(","))
        .args(&args);
    if !args.iter().any(|arg| BENCH_COMMANDS.contains(&arg.as_str())) {
        command.arg("all");
        if !args.iter().any(|arg| *arg == "--quick") && !with_metrics {
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
            command
                .arg("--write")
                .arg(docs())
                .arg("--redis-version")
                .arg(version)
                .arg("--date")
                .arg(date);
        }
    }
    let outcome = run(command);
    if outcome.is_err() {
        eprintln!("{}", server.log_tail());
    }
    outcome
}

/// The repository's docs/ directory.
fn docs() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

/// `cargo run` of one of the workspace's binaries, built with `build`
/// (`--release`, `--features ...`), with `args` after `--`.
fn package_command<A: AsRef<std::ffi::OsStr>>(package: &str, build: &[&str], args: &[A]) -> Command {
    let mut command = cargo_command(&["run", "--quiet", "--package", package]);
    command.args(build).arg("--").args(args);
    command
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
