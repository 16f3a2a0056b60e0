//! One case: clients contending for the keys on one deployment while the
//! nemesis injects one fault class.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::check::check;
use crate::deployment::{Fault, Servers, Target};
use dlock_core::{FencingToken, Leader, LockError, LockGuard, LockRequest, Locker};
use dlock_testkit::{FaultProxy, FencedResource};
use tokio::time::timeout;

/// The keys clients contend for.
pub(crate) const KEYS: [&str; 2] = ["chaos/orders", "chaos/invoices"];
pub(crate) const CLIENTS: usize = 5;
/// The semaphore clients also contend for, on deployments that offer one.
pub(crate) const SEMAPHORE: &str = "chaos/crawlers";
/// Its limit: with 5 clients, permits are scarce.
pub(crate) const PERMITS: u32 = 2;
/// The read-write lock clients also take, on deployments that offer one.
pub(crate) const CATALOG: &str = "chaos/catalog";
/// The share of its rounds that read, in percent; the others write.
pub(crate) const READ_PERCENT: u8 = 90;
/// The election clients also campaign in, on deployments that offer one.
pub(crate) const ELECTION: &str = "chaos/scheduler";
/// The client whose process also observes the election.
pub(crate) const OBSERVING_CLIENT: usize = 1;
/// Client 0 reaches the servers through the fault proxies.
pub(crate) const PROXIED_CLIENT: usize = 0;
pub(crate) const TTL: Duration = Duration::from_secs(2);
pub(crate) const WAIT: Duration = Duration::from_secs(4);
pub(crate) const HOLD: Duration = Duration::from_millis(5);
/// An operation is hung when it overruns its own limit by this much.
pub(crate) const HANG_SLACK: Duration = Duration::from_secs(5);
/// After a fault ends, how long the system may take to settle.
pub(crate) const RECOVERY: Duration = Duration::from_secs(4);
/// A waiter that sees its key free this long (outside faults) and still
/// times out is stranded: the longest a dead holder's lease can last, plus
/// a margin for a busy machine.
pub(crate) const STRANDED_AFTER: Duration = Duration::from_millis(3000);

#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    pub(crate) acquisitions: usize,
    pub(crate) lost: usize,
    pub(crate) stale_rejected: usize,
    pub(crate) overlapping: usize,
    pub(crate) stranded: usize,
    pub(crate) hung: usize,
    pub(crate) unavailable: usize,
    pub(crate) pauses: usize,
    pub(crate) pauses_reported_lost: usize,
    pub(crate) late_writes_rejected: usize,
    /// Permits of the semaphore taken.
    pub(crate) permits: usize,
    /// Instants at which more than `PERMITS` accepted permit sections were
    /// inside at once. Must be 0.
    pub(crate) over_admissions: usize,
    /// Read and write locks of the read-write lock taken.
    pub(crate) reads: usize,
    pub(crate) writes: usize,
    /// Accepted sections of the read-write lock that began while another
    /// was inside that they must exclude (a writer with anyone, a reader
    /// with a writer). Must be 0.
    pub(crate) rw_overlaps: usize,
    /// Terms led in the election.
    pub(crate) terms: usize,
    /// Accepted leader sections that began while another leader's was
    /// inside. Must be 0.
    pub(crate) two_leaders: usize,
    /// Leaders the observer reported.
    pub(crate) observed: usize,
    /// Observed leaders that no campaign asked to be (a value never
    /// campaigned with). Must be 0.
    pub(crate) phantom_leaders: usize,
    /// Observed leaders whose campaign led with another term (a key left
    /// by an earlier attempt of that campaign, reported before its
    /// clean-up). Reported, not yet a must-be-0 column.
    pub(crate) other_term_leaders: usize,
    pub(crate) notes: Vec<String>,
}

/// State the clients share with the checker.
pub(crate) struct Shared {
    pub(crate) resources: Vec<FencedResource>,
    pub(crate) tally: Mutex<Tally>,
    /// (key, from acquire to release) of every grant.
    pub(crate) grants: Mutex<Vec<(usize, Instant, Instant)>>,
    /// (key, began, gave up) of every wait that timed out.
    pub(crate) timeouts: Mutex<Vec<(usize, Instant, Instant)>>,
    /// (entered, left) of every accepted permit section: one whose guard
    /// was still held when it left, so its lease covered all of it.
    pub(crate) permit_sections: Mutex<Vec<(Instant, Instant)>>,
    /// (entered, left, writing) of every accepted read-write section.
    pub(crate) rw_sections: Mutex<Vec<(Instant, Instant, bool)>>,
    /// The election's resource: leaders write to it with their term.
    pub(crate) election_resource: FencedResource,
    /// (entered, left) of every accepted leader section.
    pub(crate) leader_sections: Mutex<Vec<(Instant, Instant)>>,
    /// Every value a campaign asked to lead with, and the term it was
    /// granted (None: no answer, or not granted).
    pub(crate) campaigns: Mutex<HashMap<String, Option<FencingToken>>>,
    /// Every leader the observer reported.
    pub(crate) observed: Mutex<Vec<Leader>>,
    pub(crate) pause_next: Vec<AtomicBool>,
    /// The next leader of the election stalls past its TTL.
    pub(crate) pause_leader: AtomicBool,
    pub(crate) stop: AtomicBool,
}

impl Shared {
    /// Empty histories, one resource per key.
    pub(crate) fn new() -> Self {
        Shared {
            resources: KEYS.iter().map(|_| FencedResource::new()).collect(),
            tally: Mutex::new(Tally::default()),
            grants: Mutex::new(Vec::new()),
            timeouts: Mutex::new(Vec::new()),
            permit_sections: Mutex::new(Vec::new()),
            rw_sections: Mutex::new(Vec::new()),
            election_resource: FencedResource::new(),
            leader_sections: Mutex::new(Vec::new()),
            campaigns: Mutex::new(HashMap::new()),
            observed: Mutex::new(Vec::new()),
            pause_next: (0..CLIENTS).map(|_| AtomicBool::new(false)).collect(),
            pause_leader: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        }
    }

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

pub(crate) fn run_case(
    servers: &mut Servers,
    network: &tokio::runtime::Runtime,
    fault: Fault,
    length: Duration,
    seed: u64,
    shared_kinds: bool,
) -> Tally {
    let shared = Arc::new(Shared::new());
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
            std::thread::spawn(move || client_process(client, target, shared, deadline, seed, shared_kinds))
        })
        .collect();
    let windows = nemesis(servers, &proxies, fault, &shared, deadline, seed, shared_kinds);
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
    elections: bool,
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
                // Where there are elections, every other pause (the first
                // included) stalls the next leader rather than a lock holder.
                if elections && windows.len() % 2 == 0 {
                    shared.pause_leader.store(true, Ordering::SeqCst);
                } else {
                    shared.pause_next[rng.usize(..CLIENTS)].store(true, Ordering::SeqCst);
                }
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

fn client_process(
    client: usize,
    target: Target,
    shared: Arc<Shared>,
    deadline: Instant,
    seed: u64,
    shared_kinds: bool,
) {
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
        let observer = (shared_kinds && client == OBSERVING_CLIENT)
            .then(|| tokio::spawn(observe(locker.clone(), Arc::clone(&shared), deadline)));
        let mut round = 0;
        while Instant::now() < deadline && !shared.stop.load(Ordering::Relaxed) {
            // One round in five each on the semaphore, the read-write lock
            // and the election, where there are.
            let pick = rng.usize(..KEYS.len() + 3);
            round += 1;
            if pick < KEYS.len() {
                one_round(client, &locker, pick, &shared).await;
            } else if shared_kinds && pick == KEYS.len() {
                permit_round(client, &locker, &shared).await;
            } else if shared_kinds && pick == KEYS.len() + 1 {
                let writing = rng.u8(..100) >= READ_PERCENT;
                rw_round(client, &locker, writing, &shared).await;
            } else if shared_kinds {
                election_round(client, round, &locker, &shared).await;
            }
        }
        if let Some(observer) = observer {
            let _ = observer.await;
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

/// What became of a request that returned no guard.
enum Missed {
    /// Its wait ran out (the checker decides whether it was stranded).
    TimedOut,
    /// Anything else, already tallied.
    Tallied,
}

/// Awaits a lock or permit request (`what` names it in notes) under a hang
/// bound, and tallies every outcome but a guard and a timeout.
async fn granted<T>(
    client: usize,
    what: &str,
    request: impl IntoFuture<Output = Result<T, LockError>>,
    shared: &Shared,
) -> Result<T, Missed> {
    match timeout(WAIT + HANG_SLACK, request).await {
        Err(_) => {
            shared.note(format!("client {client}: {what} overran its wait"));
            shared.tally().hung += 1;
            Err(Missed::Tallied)
        }
        Ok(Err(LockError::Timeout { .. })) => Err(Missed::TimedOut),
        Ok(Err(LockError::Unavailable { .. })) => {
            shared.tally().unavailable += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(Missed::Tallied)
        }
        Ok(Err(error)) => {
            shared.note(format!("client {client}: {what}: {error}"));
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(Missed::Tallied)
        }
        Ok(Ok(guard)) => Ok(guard),
    }
}

async fn one_round(client: usize, locker: &Locker, key: usize, shared: &Shared) {
    let began = Instant::now();
    let request = locker.lock(KEYS[key]).ttl(TTL).wait(WAIT);
    let guard = match granted(client, &format!("lock({})", KEYS[key]), request, shared).await {
        Ok(guard) => guard,
        Err(Missed::TimedOut) => {
            shared
                .timeouts
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((key, began, Instant::now()));
            return;
        }
        Err(Missed::Tallied) => return,
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

/// One permit of the semaphore: take it, stay inside for the hold, leave.
/// The section counts as accepted when the guard was still held at its
/// end; the checker counts instants with more than `PERMITS` of those.
async fn permit_round(client: usize, locker: &Locker, shared: &Shared) {
    let request = locker.semaphore(SEMAPHORE, PERMITS).ttl(TTL).wait(WAIT);
    let what = format!("semaphore({SEMAPHORE})");
    let Some((entered, left)) = held_section(client, &what, request, shared).await else {
        return;
    };
    shared.tally().permits += 1;
    shared
        .permit_sections
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((entered, left));
}

/// One read or write lock of the read-write lock, held for the hold; the
/// checker looks for accepted sections that overlap when they must not.
async fn rw_round(client: usize, locker: &Locker, writing: bool, shared: &Shared) {
    let (request, what) = if writing {
        (locker.lock(CATALOG), format!("lock({CATALOG})"))
    } else {
        (locker.read_lock(CATALOG), format!("read_lock({CATALOG})"))
    };
    let request = request.ttl(TTL).wait(WAIT);
    let Some((entered, left)) = held_section(client, &what, request, shared).await else {
        return;
    };
    {
        let mut tally = shared.tally();
        if writing {
            tally.writes += 1;
        } else {
            tally.reads += 1;
        }
    }
    shared
        .rw_sections
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push((entered, left, writing));
}

/// Takes the lock `request` asks for, stays inside for the hold, and
/// releases; the section (entered, left) when the guard was still held at
/// its end (an accepted section), else nothing (a loss is tallied).
async fn held_section(
    client: usize,
    what: &str,
    request: LockRequest,
    shared: &Shared,
) -> Option<(Instant, Instant)> {
    let guard = granted(client, what, request, shared).await.ok()?;
    let entered = Instant::now();
    tokio::time::sleep(HOLD).await;
    let left = Instant::now();
    let held = guard.is_held();
    if !held {
        shared.tally().lost += 1;
    }
    if timeout(HANG_SLACK, guard.release()).await.is_err() {
        shared.note(format!("client {client}: release of {what} hung"));
        shared.tally().hung += 1;
    }
    held.then_some((entered, left))
}

/// One campaign in the election: once leading, write to the election's
/// resource with the term, stay for the hold (or stall, when the nemesis
/// says so), write again, and resign. The section counts as accepted when
/// the leadership was still held at its end.
async fn election_round(client: usize, round: usize, locker: &Locker, shared: &Shared) {
    let value = format!("client-{client}/{round}");
    shared
        .campaigns
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(value.clone(), None);
    let campaign = locker.election(ELECTION).campaign(&value).ttl(TTL).wait(WAIT);
    let what = format!("campaign({ELECTION})");
    let Ok(leadership) = granted(client, &what, campaign, shared).await else {
        return;
    };
    let term = leadership.term();
    shared
        .campaigns
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(value, Some(term));
    shared.tally().terms += 1;
    let entered = Instant::now();
    let resource = &shared.election_resource;
    let _ = resource.write(client, term);
    if shared.pause_leader.swap(false, Ordering::SeqCst) {
        paused_section(client, leadership.guard(), term, resource, shared).await;
    } else {
        tokio::time::sleep(HOLD).await;
        let _ = resource.write(client, term);
    }
    let left = Instant::now();
    let held = leadership.is_held();
    if !held {
        shared.tally().lost += 1;
    }
    if timeout(HANG_SLACK, leadership.resign()).await.is_err() {
        shared.note(format!("client {client}: resign from {ELECTION} hung"));
        shared.tally().hung += 1;
    }
    if held {
        shared
            .leader_sections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((entered, left));
    }
}

/// Records every leader the election's observer reports until the case ends.
async fn observe(locker: Locker, shared: Arc<Shared>, deadline: Instant) {
    use futures_util::StreamExt;
    let mut changes = locker.election(ELECTION).observe();
    let until = tokio::time::Instant::from_std(deadline);
    loop {
        let item = tokio::select! {
            item = changes.next() => item,
            () = tokio::time::sleep_until(until) => return,
        };
        match item {
            Some(Ok(Some(leader))) => shared
                .observed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(leader),
            Some(Ok(None)) => {}
            // An outage the nemesis made: the stream goes on.
            Some(Err(LockError::Unavailable { .. })) => shared.tally().unavailable += 1,
            Some(Err(error)) => {
                shared.note(format!("observer: {error}"));
                return;
            }
            None => return,
        }
    }
}

/// The whole client stalls while holding (a GC pause, SIGSTOP), then tries
/// to finish its work.
async fn paused_section(
    client: usize,
    guard: &LockGuard,
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
