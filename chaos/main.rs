//! `cargo xtask chaos`: Jepsen-style runs of dlock on real servers while a
//! nemesis breaks things, one deployment and one fault class at a time.
//!
//! Each client is a thread with a runtime of its own (a process, in effect:
//! a pause stalls its watchdog and connections too). Clients contend for a
//! few keys; every critical section writes twice to a `FencedResource` per
//! key. The history is then checked: overlapping accepted writes, stranded
//! waiters and operations that overran their bound must all be 0.
//!
//! `dlock-chaos --help` lists the options. One case and its clients are in
//! `case.rs`, the checker in `check.rs`, the table and the document in
//! `report.rs`, the deployments and fault classes in `deployment.rs`.

// A command-line tool: its table goes to stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod case;
mod check;
mod deployment;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use case::run_case;
use deployment::{Kind, Servers};
use report::{reliability_document, render};

/// Jepsen-style runs of dlock on real servers while a nemesis breaks them.
#[derive(Parser)]
#[command(name = "dlock-chaos")]
struct Options {
    /// 8 s per case instead of 25 s (what `cargo xtask ci` runs).
    #[arg(long)]
    quick: bool,
    /// The seed of the clients' choices and the nemesis's targets; random
    /// if not given (the run prints it, to repeat a run).
    #[arg(long)]
    seed: Option<u64>,
    /// Only this deployment.
    #[arg(long, value_enum)]
    only: Option<Kind>,
    /// Write the results as docs/reliability.md to FILE.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
}

fn main() -> ExitCode {
    let options = Options::parse();
    let seed = options.seed.unwrap_or_else(|| fastrand::u64(..));
    println!(
        "dlock-chaos: seed {} ({} form); repeat with --seed {}",
        seed,
        if options.quick { "quick" } else { "full" },
        seed
    );
    let network = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("dlock-chaos: no runtime for the proxies: {error}");
            return ExitCode::FAILURE;
        }
    };
    let per_case = if options.quick {
        Duration::from_secs(8)
    } else {
        Duration::from_secs(25)
    };
    let mut rows = Vec::new();
    let mut rng = fastrand::Rng::with_seed(seed);
    for kind in Kind::ALL {
        if options.only.is_some_and(|only| only != kind) {
            continue;
        }
        let mut servers = match Servers::start(kind) {
            Ok(servers) => servers,
            Err(message) => {
                eprintln!("dlock-chaos: starting {}: {message}", kind.name());
                return ExitCode::FAILURE;
            }
        };
        for &fault in kind.faults() {
            let seed = rng.u64(..);
            let started = Instant::now();
            let tally = run_case(
                &mut servers,
                &network,
                fault,
                per_case,
                seed,
                kind.offers_shared_kinds(),
            );
            println!(
                "{:<16} {:<28} {:>5} acquisitions, {} overlapping, {} stranded, {} hung, {} permits, {} over-admitted, {}/{} reads/writes, {} reader-writer overlaps, {} terms, {} two leaders, {} observed, {} phantom leaders, {} of another term ({:.0?})",
                kind.name(),
                fault.name(),
                tally.acquisitions,
                tally.overlapping,
                tally.stranded,
                tally.hung,
                tally.permits,
                tally.over_admissions,
                tally.reads,
                tally.writes,
                tally.rw_overlaps,
                tally.terms,
                tally.two_leaders,
                tally.observed,
                tally.phantom_leaders,
                tally.other_term_leaders,
                started.elapsed()
            );
            for note in &tally.notes {
                println!("    {note}");
            }
            rows.push((kind, fault, tally));
        }
    }
    let table = render(&rows);
    println!("\n{table}");
    if let Some(path) = &options.write {
        let document = reliability_document(&table, &rows, seed, per_case);
        if let Err(error) = std::fs::write(path, document) {
            eprintln!("dlock-chaos: writing {}: {error}", path.display());
            return ExitCode::FAILURE;
        }
        println!("dlock-chaos: wrote {}", path.display());
    }
    let failed = rows.iter().any(|(kind, _, tally)| {
        tally.overlapping > 0
            || tally.stranded > 0
            || tally.hung > 0
            || tally.over_admissions > 0
            || tally.rw_overlaps > 0
            || tally.two_leaders > 0
            || tally.phantom_leaders > 0
            || tally.pauses_reported_lost < tally.pauses
            || tally.acquisitions == 0
            || (kind.offers_shared_kinds()
                && (tally.permits == 0 || tally.reads == 0 || tally.terms == 0 || tally.observed == 0))
    });
    if failed {
        eprintln!("dlock-chaos: FAILED: see the rows above with a non-zero must-be-0 column");
        ExitCode::FAILURE
    } else {
        println!("dlock-chaos: every case safe and live");
        ExitCode::SUCCESS
    }
}
