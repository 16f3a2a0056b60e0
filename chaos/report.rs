//! The results table and docs/reliability.md.

use std::time::Duration;

use crate::deployment::{Fault, Kind};

use crate::case::{
    CATALOG, CLIENTS, ELECTION, HANG_SLACK, HOLD, KEYS, OBSERVING_CLIENT, PERMITS, READ_PERCENT, RECOVERY,
    SEMAPHORE, STRANDED_AFTER, TTL, Tally, WAIT,
};

pub(crate) fn render(rows: &[(Kind, Fault, Tally)]) -> String {
    let mut table = String::from(
        "| deployment | fault | acquisitions | lost-lock signals | stale writes rejected | overlapping accepted writes | stranded waiters | hung operations | unavailable errors | pauses: reported lost / late write rejected | permits taken | over-admissions | reads / writes taken | reader-writer overlaps | terms led | two leaders accepted at once | leaders observed / phantom / other term |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
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
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            kind.name(),
            fault.name(),
            tally.acquisitions,
            tally.lost,
            tally.stale_rejected,
            tally.overlapping,
            tally.stranded,
            tally.hung,
            tally.unavailable,
            pauses,
            shared_kinds_cell(*kind, tally.permits.to_string()),
            shared_kinds_cell(*kind, tally.over_admissions.to_string()),
            shared_kinds_cell(*kind, format!("{} / {}", tally.reads, tally.writes)),
            shared_kinds_cell(*kind, tally.rw_overlaps.to_string()),
            shared_kinds_cell(*kind, tally.terms.to_string()),
            shared_kinds_cell(*kind, tally.two_leaders.to_string()),
            shared_kinds_cell(
                *kind,
                format!(
                    "{} / {} / {}",
                    tally.observed, tally.phantom_leaders, tally.other_term_leaders
                ),
            ),
        ));
    }
    table
}

pub(crate) fn reliability_document(
    table: &str,
    rows: &[(Kind, Fault, Tally)],
    seed: u64,
    per_case: Duration,
) -> String {
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
         - **lost-lock signals**: guards (and permits) found lost at the end of their critical section.\n\
         - **over-admissions** (deployments with semaphores): one round in five takes a permit of\n\
           the semaphore `{semaphore}` ({permits} permits) instead of a lock; a permit section counts when\n\
           its guard was still held at its end, and each one that began while {permits} others were\n\
           inside is an over-admission. Must be 0.\n\
         - **reader-writer overlaps** (deployments with read-write locks): one round in five takes the\n\
           read-write lock `{catalog}`, as a reader ({read_percent} % of them) or as the writer; a section\n\
           counts when its guard was still held at its end, and each writer's section that began while\n\
           anyone was inside, or reader's that began while a writer was, is an overlap. Must be 0.\n\
         - **two leaders accepted at once** (deployments with elections): one round in five campaigns\n\
           in the election `{election}`; once leading, the client writes to the election's own\n\
           `FencedResource` with its term, stays for the hold (or stalls past the TTL, when the\n\
           nemesis pauses it), writes again and resigns. A leader's section counts when its leadership\n\
           was still held at its end, and each one that began while another was inside is two leaders\n\
           at once. Must be 0.\n\
         - **leaders observed / phantom / other term**: client {observer}'s process also observes the\n\
           election (`observe()`); every leader it reports must be a value some campaign asked to lead\n\
           with (phantom: must be 0). *Other term* counts reported leaders whose campaign led with\n\
           another term: on etcd, a candidate key left by an attempt whose answer was lost in a fault\n\
           stays the oldest key, and so the leader in etcd's own terms, until it is cleaned up or its\n\
           lease ends. Not yet a must-be-0 column: under investigation.\n\
         - **stale writes rejected**: writes the fence turned away (late writes of holders that lost\n\
           their lock).\n\
         - **unavailable errors**: requests answered `Unavailable` (a majority down, a server away).\n\
         - **pauses**: holders stalled for {pause:?} (longer than the TTL; where there are elections,\n\
           every other pause, the first included, stalls the next leader); each must find its guard\n\
           lost when it resumes, and its late write is rejected whenever another client took the key\n\
           meanwhile.\n\n\
         Sentinel and Cluster clients learn server addresses from the servers, so the fault proxy\n\
         cannot sit in their path; the network faults run on single Redis, Redlock and etcd.\n\
         The single server runs with `appendonly yes` and `appendfsync always`, so a restart keeps\n\
         locks and fencing counters (docs/SAFETY.md). Killed Redlock nodes restart empty after the\n\
         TTL (the delayed-restart rule).\n\n\
         ## Results\n\n{table}",
        keys = KEYS.len(),
        semaphore = SEMAPHORE,
        permits = PERMITS,
        catalog = CATALOG,
        election = ELECTION,
        observer = OBSERVING_CLIENT,
        read_percent = READ_PERCENT,
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

/// `cell`, or "-" where the deployment has no semaphore, read-write lock
/// or election (Redlock).
fn shared_kinds_cell(kind: Kind, cell: String) -> String {
    if kind.offers_shared_kinds() {
        cell
    } else {
        "-".to_owned()
    }
}
