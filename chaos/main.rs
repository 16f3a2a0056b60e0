//! `cargo xtask chaos`: Jepsen-style runs of dlock on real servers while a
//! nemesis breaks things, one deployment and one fault class at a time.
//!
//! Each client is a thread with a runtime of its own (a process, in effect:
//! a pause stalls its watchdog and connections too). Clients contend for a
//! few keys; every critical section writes twice to a `FencedResource` per
//! key. The history is then checked: overlapping accepted writes, stranded
//! waiters and operations that overran their bound must all be 0.
//!
//! Usage: `dlock-chaos [--quick] [--seed N] [--only DEPLOYMENT] [--write FILE]`

// A command-line tool: its table goes to stdout.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod deployment;

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deployment::{Fault, Kind, Servers, Target};
use dlock_core::{FencingToken, LockError, Locker};
use dlock_testkit::{EventKind, FaultProxy, FencedResource};
use tokio::time::timeout;

/// The keys clients contend for.
const KEYS: [&str; 2] = ["chaos/orders", "chaos/invoices"];
const CLIENTS: usize = 5;
/// Client 0 reaches the servers through the fault proxies.
const PROXIED_CLIENT: usize = 0;
const TTL: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(4);
const HOLD: Duration = Duration::from_millis(5);
/// An operation is hung when it overruns its own limit by this much.
const HANG_SLACK: Duration = Duration::from_secs(5);
/// After a fault ends, how long the system may take to settle.
const RECOVERY: Duration = Duration::from_secs(4);
/// A waiter that sees its key free this long (outside faults) and still
/// times out is stranded: the longest a dead holder's lease can last, plus
/// a margin for a busy machine.
const STRANDED_AFTER: Duration = Duration::from_millis(3000);

struct Options {
    quick: bool,
    seed: u64,
    only: Option<String>,
    write: Option<String>,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        quick: false,
        seed: fastrand::u64(..),
        only: None,
        write: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--seed" => {
                options.seed = args
                    .next()
                    .and_then(|seed| seed.parse().ok())
                    .ok_or("--seed needs a number")?;
            }
            "--only" => options.only = Some(args.next().ok_or("--only needs a deployment")?),
            "--write" => options.write = Some(args.next().ok_or("--write needs a file")?),
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: dlock-chaos [--quick] [--seed N] \
                     [--only single|sentinel|cluster|redlock|etcd] [--write FILE]"
                ));
            }
        }
    }
    Ok(options)
}

/// What one case (deployment × fault) saw.
#[derive(Debug, Default, Clone)]
struct Tally {
    acquisitions: usize,
    lost: usize,
    stale_rejected: usize,
    overlapping: usize,
    stranded: usize,
    hung: usize,
    unavailable: usize,
    pauses: usize,
    pauses_reported_lost: usize,
    late_writes_rejected: usize,
    notes: Vec<String>,
}

/// State the clients share with the checker.
struct Shared {
    resources: Vec<FencedResource>,
    tally: Mutex<Tally>,
    /// (key, from acquire to release) of every grant.
    grants: Mutex<Vec<(usize, Instant, Instant)>>,
    /// (key, began, gave up) of every wait that timed out.
    timeouts: Mutex<Vec<(usize, Instant, Instant)>>,
    pause_next: Vec<AtomicBool>,
    stop: AtomicBool,
}

impl Shared {
    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn note(&self, note: String) {
        let mut tally = self.tally();
        if tally.notes.len() < 5 {
            tally.notes.push(note);
        }
    }
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("dlock-chaos: {message}");
            return ExitCode::from(64);
        }
    };
    println!(
        "dlock-chaos: seed {} ({} form); repeat with --seed {}",
        options.seed,
        if options.quick { "quick" } else { "full" },
        options.seed
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
    let mut rng = fastrand::Rng::with_seed(options.seed);
    for kind in Kind::ALL {
        if options.only.as_deref().is_some_and(|only| only != kind.flag()) {
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
            let tally = run_case(&mut servers, &network, fault, per_case, seed);
            println!(
                "{:<16} {:<28} {:>5} acquisitions, {} overlapping, {} stranded, {} hung ({:.0?})",
                kind.name(),
                fault.name(),
                tally.acquisitions,
                tally.overlapping,
                tally.stranded,
                tally.hung,
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
        let document = reliability_document(&table, &rows, options.seed, per_case);
        if let Err(error) = std::fs::write(path, document) {
            eprintln!("dlock-chaos: writing {path}: {error}");
            return ExitCode::FAILURE;
        }
        println!("dlock-chaos: wrote {path}");
    }
    let failed = rows.iter().any(|(_, _, tally)| {
        tally.overlapping > 0
            || tally.stranded > 0
            || tally.hung > 0
            || tally.pauses_reported_lost < tally.pauses
            || tally.acquisitions == 0
    });
    if failed {
        eprintln!("dlock-chaos: FAILED: see the rows above with a non-zero must-be-0 column");
        ExitCode::FAILURE
    } else {
        println!("dlock-chaos: every case safe and live");
        ExitCode::SUCCESS
    }
}

fn run_case(
    servers: &mut Servers,
    network: &tokio::runtime::Runtime,
    fault: Fault,
    length: Duration,
    seed: u64,
) -> Tally {
    let shared = Arc::new(Shared {
        resources: KEYS.iter().map(|_| FencedResource::new()).collect(),
        tally: Mutex::new(Tally::default()),
        grants: Mutex::new(Vec::new()),
        timeouts: Mutex::new(Vec::new()),
        pause_next: (0..CLIENTS).map(|_| AtomicBool::new(false)).collect(),
        stop: AtomicBool::new(false),
    });
    let proxies = if fault.is_network() {
        match servers.proxies(network) {
            Ok(proxies) => proxies,
            Err(message) => {
                shared.note(message);
                return shared.tally().clone();
            }
        }
    } else {
        Vec::new()
    };
    let case_start = Instant::now();
    let deadline = case_start + length;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let target = servers.client_addresses(
                (client == PROXIED_CLIENT && !proxies.is_empty()).then_some(proxies.as_slice()),
            );
            let shared = Arc::clone(&shared);
            let seed = seed ^ (client as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            std::thread::spawn(move || client_process(client, target, shared, deadline, seed))
        })
        .collect();
    let windows = nemesis(servers, &proxies, fault, &shared, deadline, seed);
    for client in clients {
        if client.join().is_err() {
            shared.note("a client thread panicked".to_owned());
            shared.tally().hung += 1;
        }
    }
    drop(proxies);
    let mut tally = shared.tally().clone();
    check(&shared, &windows, &mut tally);
    tally
}

/// Injects `fault` in rounds until the case ends; returns the windows
/// (fault start, end of recovery) during which waits may legitimately fail.
fn nemesis(
    servers: &mut Servers,
    proxies: &[FaultProxy],
    fault: Fault,
    shared: &Shared,
    deadline: Instant,
    seed: u64,
) -> Vec<(Instant, Instant)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut windows = Vec::new();
    // Let the clients get going first.
    std::thread::sleep(Duration::from_secs(1));
    let once = matches!(fault, Fault::Failover);
    while fault != Fault::None && Instant::now() + RECOVERY < deadline {
        let began = Instant::now();
        match fault {
            Fault::Blackhole => {
                proxies.iter().for_each(|proxy| proxy.set_blackhole(true));
                std::thread::sleep(TTL + TTL / 2);
                proxies.iter().for_each(|proxy| {
                    proxy.set_blackhole(false);
                    proxy.cut();
                });
            }
            Fault::Latency => {
                proxies
                    .iter()
                    .for_each(|proxy| proxy.set_latency(Duration::from_millis(300)));
                std::thread::sleep(Duration::from_secs(2));
                proxies.iter().for_each(|proxy| proxy.set_latency(Duration::ZERO));
            }
            Fault::ClientPause => {
                shared.pause_next[rng.usize(..CLIENTS)].store(true, Ordering::SeqCst);
                std::thread::sleep(TTL * 3);
            }
            server_side => {
                if let Err(message) = servers.inject(server_side, &mut rng, TTL) {
                    shared.note(format!("nemesis: {message}"));
                }
            }
        }
        let recovered = Instant::now() + RECOVERY;
        windows.push((began, recovered));
        std::thread::sleep(RECOVERY.min(deadline.saturating_duration_since(Instant::now())));
        if once {
            break;
        }
    }
    windows
}

fn client_process(client: usize, target: Target, shared: Arc<Shared>, deadline: Instant, seed: u64) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            shared.note(format!("client {client}: no runtime: {error}"));
            return;
        }
    };
    runtime.block_on(async {
        let locker = match connect(&target, deadline).await {
            Some(locker) => locker,
            None => {
                shared.note(format!("client {client}: could not connect before the end"));
                return;
            }
        };
        let mut rng = fastrand::Rng::with_seed(seed);
        while Instant::now() < deadline && !shared.stop.load(Ordering::Relaxed) {
            let key = rng.usize(..KEYS.len());
            one_round(client, &locker, key, &shared).await;
        }
        // Every key must still be obtainable once the faults are over: a
        // waiter that cannot get a free key is stranded.
        for key in KEYS {
            match timeout(WAIT * 3 + HANG_SLACK, locker.lock(key).ttl(TTL).wait(WAIT * 3)).await {
                Ok(Ok(guard)) => {
                    let _ = guard.release().await;
                }
                Ok(Err(error)) => {
                    shared.note(format!("client {client}: final acquisition of {}: {error}", key));
                    shared.tally().stranded += 1;
                }
                Err(_) => {
                    shared.note(format!("client {client}: final acquisition of {} hung", key));
                    shared.tally().hung += 1;
                }
            }
        }
    });
}

/// Connects, retrying while a fault makes the servers unreachable.
async fn connect(target: &Target, deadline: Instant) -> Option<Locker> {
    loop {
        match timeout(HANG_SLACK, target.connect()).await {
            Ok(Ok(locker)) => return Some(locker),
            _ if Instant::now() >= deadline => return None,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn one_round(client: usize, locker: &Locker, key: usize, shared: &Shared) {
    let began = Instant::now();
    let request = locker.lock(KEYS[key]).ttl(TTL).wait(WAIT);
    let guard = match timeout(WAIT + HANG_SLACK, request).await {
        Err(_) => {
            shared.note(format!("client {client}: lock({}) overran its wait", KEYS[key]));
            shared.tally().hung += 1;
            return;
        }
        Ok(Err(LockError::Timeout { .. })) => {
            shared
                .timeouts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((key, began, Instant::now()));
            return;
        }
        Ok(Err(LockError::Unavailable { .. })) => {
            shared.tally().unavailable += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        Ok(Err(error)) => {
            shared.note(format!("client {client}: {error}"));
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        Ok(Ok(guard)) => guard,
    };
    let acquired = Instant::now();
    shared.tally().acquisitions += 1;
    let token = guard.fencing_token();
    let resource = &shared.resources[key];
    let _ = resource.write(client, token);
    if shared.pause_next[client].swap(false, Ordering::SeqCst) {
        paused_section(client, &guard, token, resource, shared).await;
    } else {
        tokio::time::sleep(HOLD).await;
        let _ = resource.write(client, token);
    }
    if !guard.is_held() {
        shared.tally().lost += 1;
    }
    let released = Instant::now();
    match timeout(HANG_SLACK, guard.release()).await {
        Err(_) => {
            shared.note(format!("client {client}: release({}) hung", KEYS[key]));
            shared.tally().hung += 1;
        }
        Ok(_) => {
            shared
                .grants
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((key, acquired, released));
        }
    }
}

/// The whole client stalls while holding (a GC pause, SIGSTOP), then tries
/// to finish its work.
async fn paused_section(
    client: usize,
    guard: &dlock_core::LockGuard,
    token: FencingToken,
    resource: &FencedResource,
    shared: &Shared,
) {
    std::thread::sleep(TTL * 2 + TTL / 2);
    let reported = !guard.is_held() && timeout(TTL, guard.lost()).await.is_ok();
    let late = resource.write(client, token);
    let mut tally = shared.tally();
    tally.pauses += 1;
    if reported {
        tally.pauses_reported_lost += 1;
    }
    if late.is_err() {
        tally.late_writes_rejected += 1;
    }
}

/// Reads the histories: overlapping accepted writes, stale rejections,
/// stranded waiters.
fn check(shared: &Shared, windows: &[(Instant, Instant)], tally: &mut Tally) {
    for resource in &shared.resources {
        let mut closed: HashSet<(usize, FencingToken)> = HashSet::new();
        let mut current: Option<(usize, FencingToken)> = None;
        for event in resource.history() {
            match event.kind {
                EventKind::RejectedStale => tally.stale_rejected += 1,
                EventKind::Entered => {
                    let holding = (event.client, event.token);
                    if current != Some(holding) {
                        if let Some(previous) = current {
                            closed.insert(previous);
                        }
                        // A holding that wrote again after another holding's
                        // accepted write: the two interleaved.
                        if closed.contains(&holding) {
                            tally.overlapping += 1;
                            if tally.notes.len() < 5 {
                                tally.notes.push(format!(
                                    "overlap: client {} wrote with token {} after another holder",
                                    event.client, event.token
                                ));
                            }
                        }
                        current = Some(holding);
                    }
                }
                EventKind::Exited => {}
            }
        }
    }
    let grants = shared.grants.lock().unwrap_or_else(PoisonError::into_inner);
    let timeouts = shared.timeouts.lock().unwrap_or_else(PoisonError::into_inner);
    for &(key, began, gave_up) in timeouts.iter() {
        let mut busy: Vec<(Instant, Instant)> = grants
            .iter()
            .filter(|(granted_key, from, to)| *granted_key == key && *to > began && *from < gave_up)
            .map(|&(_, from, to)| (from, to))
            .collect();
        // Fault windows count as busy: waits may fail there by design.
        busy.extend(windows.iter().filter(|(from, to)| *to > began && *from < gave_up));
        busy.sort();
        let mut free_since = began;
        let mut longest_free = Duration::ZERO;
        for (from, to) in busy {
            longest_free = longest_free.max(from.saturating_duration_since(free_since));
            free_since = free_since.max(to);
        }
        longest_free = longest_free.max(gave_up.saturating_duration_since(free_since));
        if longest_free > STRANDED_AFTER {
            tally.stranded += 1;
            if tally.notes.len() < 5 {
                tally.notes.push(format!(
                    "stranded: a waiter on {} timed out although the key was free for {longest_free:.1?}",
                    KEYS[key]
                ));
            }
        }
    }
}

fn render(rows: &[(Kind, Fault, Tally)]) -> String {
    let mut table = String::from(
        "| deployment | fault | acquisitions | lost-lock signals | stale writes rejected | overlapping accepted writes | stranded waiters | hung operations | unavailable errors | pauses: reported lost / late write rejected |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for (kind, fault, tally) in rows {
        let pauses = if tally.pauses == 0 {
            "-".to_owned()
        } else {
            format!(
                "{}: {} / {}",
                tally.pauses, tally.pauses_reported_lost, tally.late_writes_rejected
            )
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            kind.name(),
            fault.name(),
            tally.acquisitions,
            tally.lost,
            tally.stale_rejected,
            tally.overlapping,
            tally.stranded,
            tally.hung,
            tally.unavailable,
            pauses
        ));
    }
    table
}

fn reliability_document(table: &str, rows: &[(Kind, Fault, Tally)], seed: u64, per_case: Duration) -> String {
    let total: usize = rows.iter().map(|(_, _, tally)| tally.acquisitions).sum();
    format!(
        "# Reliability\n\n\
         Written by `cargo xtask chaos` (seed {seed}, {per_case:?} per case, {total} acquisitions in all).\n\
         Rerun with `cargo xtask chaos --seed {seed}`; the seed fixes the clients' choices and the\n\
         nemesis's targets, while server timing still varies from run to run.\n\n\
         ## Method\n\n\
         For each deployment (servers started on loopback, as in the test suites) and each fault\n\
         class, {CLIENTS} clients contend for {keys} keys for the length of the case. Each client is a\n\
         thread with its own Tokio runtime and its own connections, so a pause stalls all of it, like a\n\
         process. A critical section writes twice to a `FencedResource` (one per key), which turns away\n\
         a token older than one it has accepted. TTL {ttl:?}, wait {wait:?}, hold {hold:?}.\n\
         The nemesis waits 1 s, then injects its fault in rounds, each followed by {recovery:?} of recovery.\n\n\
         - **overlapping accepted writes**: a holder's write accepted after another holder's write\n\
           (the two critical sections interleaved at the resource). Must be 0.\n\
         - **stranded waiters**: a `lock()` that timed out although, outside fault windows, its key was\n\
           free for more than {stranded:?}; and, after the case, any client that cannot get every key\n\
           within {final_wait:?}. Must be 0.\n\
         - **hung operations**: `lock()` overrunning its wait, or `release()` taking, more than\n\
           {slack:?} beyond its limit. Must be 0.\n\
         - **lost-lock signals**: guards found lost at the end of their critical section.\n\
         - **stale writes rejected**: writes the fence turned away (late writes of holders that lost\n\
           their lock).\n\
         - **unavailable errors**: requests answered `Unavailable` (a majority down, a server away).\n\
         - **pauses**: holders stalled for {pause:?} (longer than the TTL); each must find its guard\n\
           lost when it resumes, and its late write is rejected whenever another client took the key\n\
           meanwhile.\n\n\
         Sentinel and Cluster clients learn server addresses from the servers, so the fault proxy\n\
         cannot sit in their path; the network faults run on single Redis, Redlock and etcd.\n\
         The single server runs with `appendonly yes` and `appendfsync always`, so a restart keeps\n\
         locks and fencing counters (docs/SAFETY.md). Killed Redlock nodes restart empty after the\n\
         TTL (the delayed-restart rule).\n\n\
         ## Results\n\n{table}",
        keys = KEYS.len(),
        ttl = TTL,
        wait = WAIT,
        hold = HOLD,
        recovery = RECOVERY,
        stranded = STRANDED_AFTER,
        final_wait = WAIT * 3,
        slack = HANG_SLACK,
        pause = TTL * 2 + TTL / 2,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            resources: vec![FencedResource::new()],
            tally: Mutex::new(Tally::default()),
            grants: Mutex::new(Vec::new()),
            timeouts: Mutex::new(Vec::new()),
            pause_next: Vec::new(),
            stop: AtomicBool::new(false),
        }
    }

    #[test]
    fn interleaved_holders_count_as_overlap() {
        let shared = shared();
        let resource = &shared.resources[0];
        // Two holders given the same token (what a lost counter could do):
        // the fence cannot tell them apart, the checker must.
        resource.write(1, FencingToken::new(7)).expect("first holder");
        resource.write(2, FencingToken::new(7)).expect("second holder");
        resource
            .write(1, FencingToken::new(7))
            .expect("first holder again");
        let mut tally = Tally::default();
        check(&shared, &[], &mut tally);
        assert_eq!(tally.overlapping, 1);
    }

    #[test]
    fn fenced_late_writes_are_not_overlaps() {
        let shared = shared();
        let resource = &shared.resources[0];
        resource.write(1, FencingToken::new(7)).expect("first holder");
        resource.write(2, FencingToken::new(8)).expect("second holder");
        assert!(resource.write(1, FencingToken::new(7)).is_err());
        let mut tally = Tally::default();
        check(&shared, &[], &mut tally);
        assert_eq!((tally.overlapping, tally.stale_rejected), (0, 1));
    }

    #[test]
    fn a_timeout_on_a_free_key_is_stranded_unless_a_fault_covers_it() {
        let shared = shared();
        let began = Instant::now();
        let gave_up = began + Duration::from_secs(4);
        shared
            .timeouts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((0, began, gave_up));
        let mut tally = Tally::default();
        check(&shared, &[], &mut tally);
        assert_eq!(tally.stranded, 1);
        let mut tally = Tally::default();
        check(&shared, &[(began, gave_up)], &mut tally);
        assert_eq!(tally.stranded, 0);
    }
}
