//! Checks of leader election: one leader at a time, terms that increase,
//! proclamations that keep the term and need the lead, loss signals,
//! cancel-safe waiting, and observers that see every change. On a backend
//! without elections ([`SuiteConfig::elections`](super::SuiteConfig::elections)
//! off) each check asserts the typed `Unsupported` answer instead.

use std::time::Duration;

use dlock_core::{Leader, Leadership, LockError, Locker, MAX_VALUE_LEN, NotHeldReason, Observation};
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use super::{Harness, LONG_TTL, unique_key, until_nothing_left};

/// On a backend that does not offer elections: a campaign is refused as
/// `Unsupported` and leaves nothing. Returns true when the check must stop.
async fn unsupported_here(harness: &dyn Harness, locker: &Locker, key: &str) -> bool {
    if harness.config().elections {
        return false;
    }
    match locker.election(key).campaign("candidate").try_campaign().await {
        Err(LockError::Unsupported { what, .. }) => assert!(what.contains("election"), "{what}"),
        other => panic!("a backend without elections must answer Unsupported, got {other:?}"),
    }
    match locker.election(key).leader().await {
        Err(LockError::Unsupported { .. }) => {}
        other => panic!("a backend without elections must answer Unsupported, got {other:?}"),
    }
    until_nothing_left(harness, key, "a refused campaign left state behind").await;
    true
}

/// A candidate on its own client that campaigns with `value` (waiting up
/// to 25 s) in a task; yields the outcome and when it came.
async fn campaigning_in_task(
    harness: &dyn Harness,
    key: &str,
    value: &str,
) -> JoinHandle<(Result<Leadership, LockError>, Instant)> {
    let client = harness.locker().await;
    let (key, value) = (key.to_owned(), value.to_owned());
    tokio::spawn(async move {
        let campaign = client.election(&key).campaign(value);
        let leadership = campaign.ttl(LONG_TTL).wait(Duration::from_secs(25)).await;
        (leadership, Instant::now())
    })
}

/// The next item of `observation` within `within`, which must be `expected`.
async fn next_is(observation: &mut Observation, expected: Option<&Leader>, within: Duration, what: &str) {
    let item = timeout(within, observation.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no item within {within:?} (expected {expected:?})"));
    let leader = item
        .unwrap_or_else(|| panic!("{what}: the observation ended"))
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    assert_eq!(leader.as_ref(), expected, "{what}");
}

/// `locker`'s candidate leads the election `key` with `value` (waiting
/// for it), on a long lease.
async fn leads(locker: &Locker, key: &str, value: &str) -> Leadership {
    let campaign = locker.election(key).campaign(value).ttl(LONG_TTL);
    campaign.await.expect("the candidate leads")
}

fn leader_of(leadership: &Leadership) -> Leader {
    Leader {
        value: leadership.value(),
        term: leadership.term(),
    }
}

/// One candidate leads at a time: a second one is `Contended`, or waits
/// until the leader resigns and then leads (woken within the wake bound)
/// with a higher term; `leader()` shows each in turn, then nobody.
pub async fn one_leader_at_a_time(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("one_leader_at_a_time");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let election = locker.election(&key);
    assert_eq!(election.leader().await.expect("leader"), None, "nobody leads yet");
    let first = election
        .campaign("node-a:8080")
        .ttl(LONG_TTL)
        .await
        .expect("the first candidate leads");
    assert!(first.is_held());
    assert_eq!(first.value(), "node-a:8080");
    assert_eq!(election.leader().await.expect("leader"), Some(leader_of(&first)));

    let other = harness.locker().await;
    match other.election(&key).campaign("node-b:8080").try_campaign().await {
        Err(LockError::Contended { key: reported }) => assert_eq!(reported, key),
        outcome => panic!("a second candidate while one leads: expected Contended, got {outcome:?}"),
    }
    let second = campaigning_in_task(harness, &key, "node-b:8080").await;
    sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "the second candidate waits while the first leads"
    );
    assert_eq!(
        other.election(&key).leader().await.expect("leader"),
        Some(leader_of(&first)),
        "a waiting candidate changes nothing"
    );

    let resigned_at = Instant::now();
    let first_term = first.term();
    first.resign().await.expect("resign");
    let (second, elected_at) = second.await.expect("candidate task");
    let second = second.expect("the waiting candidate leads once the leader resigned");
    let bound = harness.config().wake_bound;
    assert!(
        elected_at - resigned_at < bound,
        "the next candidate led {:?} after the resignation (bound {bound:?}): not woken by a notification",
        elected_at - resigned_at
    );
    assert!(second.term() > first_term, "terms must increase");
    assert_eq!(election.leader().await.expect("leader"), Some(leader_of(&second)));
    second.resign().await.expect("resign");
    assert_eq!(
        election.leader().await.expect("leader"),
        None,
        "nobody leads after resigning"
    );
    until_nothing_left(harness, &key, "a resigned election left state behind").await;
}

/// `proclaim` changes the public value and keeps the term; once another
/// candidate leads, the old leader's proclamation is refused (`NotHeld`,
/// and it turns lost) and changes nothing.
pub async fn proclaim_keeps_the_term_and_needs_the_lead(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("proclaim_keeps_the_term_and_needs_the_lead");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let election = locker.election(&key);
    let ttl = harness.config().short_ttl;
    let old = election.campaign("v1").ttl(ttl).await.expect("leads");
    old.proclaim("v2").await.expect("proclaim while leading");
    assert_eq!(old.value(), "v2");
    let shown = election.leader().await.expect("leader").expect("someone leads");
    assert_eq!(
        shown,
        Leader {
            value: "v2".into(),
            term: old.term()
        },
        "same term, new value"
    );

    harness.force_expire(&key).await;
    let new = harness
        .locker()
        .await
        .election(&key)
        .campaign("usurper")
        .ttl(LONG_TTL)
        .wait(ttl * 4)
        .await
        .expect("another candidate leads once the lease ended");
    assert!(new.term() > old.term());
    match old.proclaim("v3").await {
        Err(LockError::NotHeld { reason, .. }) => assert_eq!(reason, NotHeldReason::OtherOwner),
        Err(LockError::Lost { .. }) => {}
        outcome => panic!("a proclamation after losing the lead: expected NotHeld, got {outcome:?}"),
    }
    assert!(!old.is_held(), "a refused proclamation shows the loss");
    assert_eq!(old.value(), "v2", "a refused proclamation keeps the old value");
    assert_eq!(election.leader().await.expect("leader"), Some(leader_of(&new)));
    new.resign().await.expect("resign");
}

/// A leadership whose lease is ended behind its back turns lost, like a
/// lock: `lost()` resolves and `is_held()` is false.
pub async fn lost_leadership_is_signalled(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("lost_leadership_is_signalled");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let ttl = harness.config().short_ttl;
    let leadership = locker
        .election(&key)
        .campaign("leader")
        .ttl(ttl)
        .await
        .expect("leads");
    harness.force_expire(&key).await;
    timeout(ttl * 2, leadership.lost())
        .await
        .expect("lost() must resolve within the TTL");
    assert!(!leadership.is_held());
    match leadership.resign().await {
        Err(LockError::NotHeld { .. } | LockError::Lost { .. }) => {}
        outcome => panic!("resigning a lost leadership: expected NotHeld, got {outcome:?}"),
    }
}

/// A leader that dies without resigning is replaced once its TTL runs
/// out, not before, and not much later; the new term is higher.
pub async fn dead_leader_is_replaced_after_its_ttl(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("dead_leader_is_replaced_after_its_ttl");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let ttl = harness.config().short_ttl;
    let started = Instant::now();
    let dead = locker
        .election(&key)
        .campaign("dead")
        .ttl(ttl)
        .await
        .expect("leads");
    let term = dead.term();
    dead.forget(); // as if the process died
    let next = harness
        .locker()
        .await
        .election(&key)
        .campaign("next")
        .ttl(LONG_TTL)
        .wait(ttl * 5)
        .await
        .expect("the next candidate leads after the dead leader's TTL");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= ttl * 9 / 10,
        "led after {elapsed:?}, before the dead leader's TTL of {ttl:?} ran out"
    );
    assert!(elapsed < ttl * 3, "led only {elapsed:?} after a TTL of {ttl:?}");
    assert!(next.term() > term);
    next.resign().await.expect("resign");
}

/// An observer sees the current state first, then every change in order
/// and once: a new leader, a proclamation, a resignation (`None`), the
/// next leader; each within the wake bound.
pub async fn observers_see_every_change(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("observers_see_every_change");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let bound = harness.config().wake_bound;
    let observer = harness.locker().await;
    let mut changes = observer.election(&key).observe();
    next_is(&mut changes, None, bound, "first item: nobody leads").await;

    let election = locker.election(&key);
    let first = election.campaign("a").ttl(LONG_TTL).await.expect("leads");
    next_is(&mut changes, Some(&leader_of(&first)), bound, "a new leader").await;
    first.proclaim("a2").await.expect("proclaim");
    next_is(&mut changes, Some(&leader_of(&first)), bound, "a proclamation").await;
    first.resign().await.expect("resign");
    next_is(&mut changes, None, bound, "a resignation").await;
    let second = election.campaign("b").ttl(LONG_TTL).await.expect("leads");
    next_is(&mut changes, Some(&leader_of(&second)), bound, "the next leader").await;

    // Nothing changes: nothing more is reported (no duplicates).
    let quiet = timeout(Duration::from_millis(500), changes.next()).await;
    assert!(quiet.is_err(), "an item with no change: {quiet:?}");

    // A late observer starts from the current leader.
    let mut late = harness.locker().await.election(&key).observe();
    next_is(
        &mut late,
        Some(&leader_of(&second)),
        bound,
        "a late observer's first item",
    )
    .await;
    second.resign().await.expect("resign");
    next_is(&mut late, None, bound, "the late observer sees the resignation").await;
}

/// When a leader dies without resigning and nobody takes over, observers
/// are told `None` once its lease has ended (within the wake bound after
/// it), not before.
pub async fn observers_see_a_dead_leader_go(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("observers_see_a_dead_leader_go");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let (ttl, bound) = (harness.config().short_ttl, harness.config().wake_bound);
    let dead = locker
        .election(&key)
        .campaign("dead")
        .ttl(ttl)
        .await
        .expect("leads");
    let elected_at = Instant::now();
    let mut changes = harness.locker().await.election(&key).observe();
    next_is(&mut changes, Some(&leader_of(&dead)), bound, "the leader").await;
    dead.forget();
    next_is(&mut changes, None, ttl + bound, "the dead leader's lease ended").await;
    let told_after = elected_at.elapsed();
    assert!(
        told_after >= ttl * 9 / 10,
        "told that nobody leads {told_after:?} after the election, before the TTL of {ttl:?} ran out"
    );
}

/// Candidates that are cancelled while they wait (a dropped future, an
/// aborted task) leave nothing behind, and do not keep the next candidate out.
pub async fn cancelled_candidates_leave_nothing(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("cancelled_candidates_leave_nothing");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let leader = leads(&locker, &key, "leader").await;
    let candidate = harness.locker().await;
    let dropped = timeout(
        Duration::from_millis(200),
        candidate.election(&key).campaign("dropped"),
    )
    .await;
    assert!(
        dropped.is_err(),
        "the candidate must still be waiting when dropped"
    );
    let aborted = {
        let election = candidate.election(&key);
        tokio::spawn(async move { election.campaign("aborted").await })
    };
    sleep(Duration::from_millis(200)).await;
    aborted.abort();
    assert!(aborted.await.is_err_and(|error| error.is_cancelled()));
    leader.resign().await.expect("resign");
    until_nothing_left(harness, &key, "a cancelled candidate left state behind").await;
    let next = harness
        .locker()
        .await
        .election(&key)
        .campaign("next")
        .try_campaign()
        .await
        .expect("nobody may lead now");
    assert_eq!(next.value(), "next");
    next.resign().await.expect("resign");
}

/// Waiting candidates all lead in turn when each resigns, with rising
/// terms; on a backend that keeps elections in line
/// ([`SuiteConfig::election_fifo`](super::SuiteConfig::election_fifo)),
/// in the order they arrived.
pub async fn candidates_lead_in_turn(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("candidates_lead_in_turn");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let leader = leads(&locker, &key, "first").await;
    let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut candidates = Vec::new();
    for position in 0..4u32 {
        let client = harness.locker().await;
        let (key, order_tx) = (key.clone(), order_tx.clone());
        candidates.push(tokio::spawn(async move {
            let election = client.election(&key);
            let leadership = election
                .campaign(format!("candidate-{position}"))
                .ttl(LONG_TTL)
                .wait(Duration::from_secs(25))
                .await
                .expect("every candidate leads in turn");
            let shown = election.leader().await.expect("leader");
            order_tx
                .send((position, leadership.term(), shown == Some(leader_of(&leadership))))
                .expect("order channel");
            sleep(Duration::from_millis(20)).await;
            leadership.resign().await.expect("resign");
        }));
        // Arrival order is the order of their first attempts.
        sleep(Duration::from_millis(100)).await;
    }
    drop(order_tx);
    let mut last_term = leader.term();
    leader.resign().await.expect("resign");
    let mut order = Vec::new();
    while let Some((position, term, shown)) = order_rx.recv().await {
        assert!(term > last_term, "terms must increase: {term} after {last_term}");
        assert!(shown, "candidate {position} led but leader() showed someone else");
        last_term = term;
        order.push(position);
    }
    for candidate in candidates {
        candidate.await.expect("candidate task");
    }
    assert_eq!(order.len(), 4, "every candidate leads once: {order:?}");
    if harness.config().election_fifo {
        assert_eq!(order, vec![0, 1, 2, 3], "candidates lead in arrival order");
    }
    until_nothing_left(harness, &key, "the election left state behind").await;
}

/// An election's key is used for nothing else: locks, read locks and
/// semaphores on it, and campaigns or leader reads on a lock's key, are
/// `WrongKind`, and leave nothing behind.
pub async fn elections_and_locks_do_not_mix(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("elections_and_locks_do_not_mix");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let leader = leads(&locker, &key, "leader").await;
    let other = harness.locker().await;
    let refusals = [
        ("a lock", other.lock(&key).try_lock().await.err()),
        ("a read lock", other.read_lock(&key).try_lock().await.err()),
        ("a semaphore", other.semaphore(&key, 2).try_lock().await.err()),
    ];
    for (what, error) in refusals {
        match error {
            Some(LockError::WrongKind { key: reported, .. }) => assert_eq!(reported, key),
            // Backends without the kind refuse it as such.
            Some(LockError::Unsupported { .. }) => {}
            outcome => panic!("{what} on an election's key: expected WrongKind, got {outcome:?}"),
        }
    }
    assert!(leader.is_held(), "a refused request changes nothing");
    leader.resign().await.expect("resign");

    let lock_key = unique_key("elections_and_locks_do_not_mix/lock");
    let guard = locker.lock(&lock_key).ttl(LONG_TTL).await.expect("lock");
    let election = other.election(&lock_key);
    match election.campaign("candidate").try_campaign().await {
        Err(LockError::WrongKind { .. }) => {}
        outcome => panic!("a campaign on a lock's key: expected WrongKind, got {outcome:?}"),
    }
    match election.leader().await {
        Err(LockError::WrongKind { .. }) => {}
        outcome => panic!("leader() on a lock's key: expected WrongKind, got {outcome:?}"),
    }
    guard.release().await.expect("release");
    until_nothing_left(harness, &key, "refused requests left state behind").await;
    until_nothing_left(harness, &lock_key, "a refused campaign left state behind").await;
}

/// Bad input to an election is a typed error that takes nothing: a value
/// over [`MAX_VALUE_LEN`] in a campaign or a proclamation, an invalid key.
pub async fn bad_election_input_is_rejected(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("bad_election_input_is_rejected");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let election = locker.election(&key);
    let huge = "x".repeat(MAX_VALUE_LEN + 1);
    match election.campaign(huge.clone()).try_campaign().await {
        Err(LockError::InvalidOptions { reason, .. }) => assert!(reason.contains("value"), "{reason}"),
        outcome => panic!("a huge value: expected InvalidOptions, got {outcome:?}"),
    }
    assert_eq!(
        election.leader().await.expect("leader"),
        None,
        "nothing was taken"
    );
    let leader = election.campaign("ok").ttl(LONG_TTL).await.expect("leads");
    assert!(matches!(
        leader.proclaim(huge).await,
        Err(LockError::InvalidOptions { .. })
    ));
    assert_eq!(leader.value(), "ok");
    leader.resign().await.expect("resign");
    for bad_key in ["", "bad\nkey"] {
        let election = locker.election(bad_key);
        assert!(matches!(
            election.campaign("v").try_campaign().await,
            Err(LockError::InvalidKey { .. })
        ));
        assert!(matches!(
            election.leader().await,
            Err(LockError::InvalidKey { .. })
        ));
        let mut observation = election.observe();
        let first = observation.next().await;
        assert!(
            matches!(first, Some(Err(LockError::InvalidKey { .. }))),
            "observe() on an invalid key: {first:?}"
        );
        assert!(
            observation.next().await.is_none(),
            "the observation ends after the error"
        );
    }
    until_nothing_left(harness, &key, "rejected input left state behind").await;
}
