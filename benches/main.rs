//! `cargo xtask bench`: dlock against the floor (the same round trips with
//! the raw client and no library) and the peers from crates.io, on the same
//! servers, in one run, interleaved, as ratios. xtask starts the servers and
//! passes their addresses as flags.
//!
//! One module per scenario (numbered as in the benchmark issue) under
//! `scenarios/`; the contenders, the statistics and the report are shared.
//! `dlock-bench --help` lists the scenarios and the profiling loops.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod contenders;
mod plot;
mod report;
mod scenarios;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::report::Report;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// dlock against the raw-client floor and the peer crates, on the same
/// servers in one run.
#[derive(Parser)]
#[command(name = "dlock-bench")]
struct Cli {
    #[command(flatten)]
    servers: Servers,
    /// A few seconds per scenario: shows that the harness and the peers run
    /// (what `cargo xtask ci` does); the figures are rough.
    #[arg(long, global = true)]
    quick: bool,
    #[command(subcommand)]
    command: Command,
}

/// Where the servers are; `cargo xtask bench` starts them and fills these in.
#[derive(Args)]
pub(crate) struct Servers {
    /// The single Redis server.
    #[arg(long, global = true, value_name = "URL")]
    redis_url: Option<String>,
    /// The independent Redis servers for Redlock, comma-separated.
    #[arg(long, global = true, value_name = "URLS", value_delimiter = ',')]
    redlock_urls: Vec<String>,
    /// The etcd endpoints, comma-separated.
    #[arg(long, global = true, value_name = "ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
}

impl Servers {
    pub(crate) fn redis(&self) -> Result<&str> {
        self.redis_url.as_deref().ok_or_else(|| missing("--redis-url"))
    }
    pub(crate) fn redlock(&self) -> Result<&[String]> {
        non_empty(&self.redlock_urls, "--redlock-urls")
    }
    pub(crate) fn etcd(&self) -> Result<&[String]> {
        non_empty(&self.etcd_endpoints, "--etcd-endpoints")
    }
}

fn non_empty<'a>(list: &'a [String], flag: &str) -> Result<&'a [String]> {
    if list.is_empty() {
        Err(missing(flag))
    } else {
        Ok(list)
    }
}

fn missing(flag: &str) -> Box<dyn std::error::Error + Send + Sync> {
    format!("{flag} is not given; run `cargo xtask bench`, which starts the servers and passes it").into()
}

#[derive(Subcommand)]
enum Command {
    /// Every scenario in one run, printed as a table and a summary.
    All {
        /// Also write the report (benchmarks.md and the latency plot) into DIR.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
        /// The Redis server's version, for the report.
        #[arg(long, default_value = "unknown")]
        redis_version: String,
        /// The date of the run, for the report.
        #[arg(long, default_value = "unknown")]
        date: String,
    },
    /// 1 and 4: the uncontended acquire + release cycle on one Redis, and
    /// Redlock on the independent nodes.
    Uncontended,
    /// 2: throughput of 64 tasks on 64 keys through one shared client.
    Throughput,
    /// 3: the hand-off, 8 clients of each library on one key, 1 ms hold.
    Handoff,
    /// 6: the read-write lock: the uncontended read cycle, and 16 clients
    /// with 90 % reads and 1 ms holds, beside distributed-lock's.
    ReadWrite,
    /// 5: etcd lock + unlock with a warm session.
    Etcd,
    /// 6: the watchdog holding many auto-renewed guards.
    Watchdog,
    /// 7: leader election on Redis and etcd: resign -> next leader (beside
    /// the mutex hand-off), killed leader -> next leader, observer delay
    /// after a proclamation; on etcd beside etcd's own election service.
    Election,
    /// One loop, long enough to attach a profiler: throughput (one
    /// contender), throughput-vs, handoff or etcd-growth.
    Profile {
        #[arg(value_enum)]
        profile: Profile,
        /// The contender of the `throughput` profile.
        #[arg(long, value_enum, default_value = "dlock")]
        contender: Solo,
        /// How long the `throughput` and `handoff` profiles run.
        #[arg(long, default_value = "15")]
        seconds: u64,
    },
}

/// The profiling loops.
#[derive(Clone, Copy, ValueEnum)]
enum Profile {
    /// Scenario 2 for one contender (`--contender`).
    Throughput,
    /// Scenario 2 for the two floors, dlock and rslock, 8 slices each.
    ThroughputVs,
    /// dlock's scenario 3 alone.
    Handoff,
    /// Scenario 5's cycle, floor and dlock, in 8 batches of 1 000 on one key
    /// (does the cycle slow down as acquisitions of a key accumulate?).
    EtcdGrowth,
}

/// A contender that can run alone under a profiler.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Solo {
    Dlock,
    Floor,
    Rslock,
}

/// How long each scenario runs.
#[derive(Clone, Copy)]
pub(crate) struct Budget {
    pub(crate) quick: bool,
}

impl Budget {
    /// Uncontended cycles per contender.
    pub(crate) fn cycles(self) -> usize {
        if self.quick { 2_000 } else { 20_000 }
    }
    /// Rounds the interleaved cycles are split into.
    pub(crate) const ROUNDS: usize = 10;
}

#[tokio::main]
async fn main() -> Result {
    let cli = Cli::parse();
    let budget = Budget { quick: cli.quick };
    let servers = &cli.servers;
    let mut report = Report::new();
    report.line(format!(
        "dlock's `metrics` feature: {}",
        if cfg!(feature = "metrics") {
            "on, with no recorder installed"
        } else {
            "off"
        }
    ));
    match cli.command {
        Command::All {
            write,
            redis_version,
            date,
        } => {
            let round_trip = scenarios::uncontended::run(servers, budget, &mut report).await?;
            scenarios::etcd::run(servers, budget, &mut report).await?;
            scenarios::handoff::run(servers, budget, round_trip, &mut report).await?;
            scenarios::throughput::run(servers, budget, &mut report).await?;
            scenarios::rwlock::run(servers, budget, &mut report).await?;
            scenarios::watchdog::run(servers, budget, &mut report).await?;
            scenarios::election::run(servers, budget, &mut report).await?;
            report.print();
            if let Some(dir) = write {
                report.write(&dir, &redis_version, &date)?;
                println!("wrote {}", dir.join("benchmarks.md").display());
            }
        }
        Command::Uncontended => {
            scenarios::uncontended::run(servers, budget, &mut report).await?;
            report.print();
        }
        Command::Throughput => {
            scenarios::throughput::run(servers, budget, &mut report).await?;
            report.print();
        }
        Command::Handoff => {
            let round_trip = contenders::round_trip(servers.redis()?).await?;
            scenarios::handoff::run(servers, budget, round_trip, &mut report).await?;
            report.print();
        }
        Command::ReadWrite => {
            scenarios::rwlock::run(servers, budget, &mut report).await?;
            report.print();
        }
        Command::Etcd => {
            scenarios::etcd::run(servers, budget, &mut report).await?;
            report.print();
        }
        Command::Watchdog => {
            scenarios::watchdog::run(servers, budget, &mut report).await?;
            report.print();
        }
        Command::Election => {
            scenarios::election::run(servers, budget, &mut report).await?;
            report.print();
        }
        Command::Profile {
            profile,
            contender,
            seconds,
        } => {
            let duration = Duration::from_secs(seconds);
            match profile {
                Profile::Throughput => {
                    scenarios::throughput::profile(servers.redis()?, contender, duration).await?
                }
                Profile::ThroughputVs => scenarios::throughput::profile_versus(servers.redis()?).await?,
                Profile::Handoff => scenarios::handoff::profile(servers.redis()?, duration).await?,
                Profile::EtcdGrowth => scenarios::etcd::profile_growth(servers.etcd()?).await?,
            }
        }
    }
    Ok(())
}
