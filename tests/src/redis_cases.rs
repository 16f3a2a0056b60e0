//! Checks every Redis deployment (single, Cluster, Sentinel) runs, beside
//! the conformance suite: mutual exclusion under load, and keys that hold
//! what dlock did not put there. [`redis_suite!`](crate::redis_suite) makes
//! one test per check for a deployment.

use std::time::Duration;

use dlock_core::{LockError, LockGuard, Locker};
use dlock_testkit::conformance::unique_key;
use dlock_testkit::{
    CheckerConfig, check_election, check_mutual_exclusion, check_read_write, check_semaphore,
};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use crate::RedisHarness;

/// Generates, for one deployment, a `#[tokio::test]` per conformance check
/// and per check in this module.
#[macro_export]
macro_rules! redis_suite {
    ($deployment:expr) => {
        dlock_testkit::conformance_tests!(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $crate::RedisHarness::new($deployment).await
        );

        $crate::redis_suite!(@cases $deployment;
            mutual_exclusion_16_clients_200_acquisitions,
            semaphore_16_clients_on_4_permits,
            read_write_16_clients_90_percent_reads,
            election_8_candidates_lead_in_turn,
            a_key_of_another_type_is_reported_and_left_alone,
            a_foreign_string_is_reported_and_left_alone,
            a_broken_fencing_counter_is_reported_and_takes_nothing,
            a_wrong_password_is_refused_and_never_shown,
            a_waiter_whose_place_ran_out_is_passed_over,
            a_waiter_that_died_holds_the_line_up_for_its_place_lease_at_most,
            a_lost_hand_over_message_is_made_up_for_by_the_renewal,
            a_handed_over_lock_lasts_its_ttl,
        );
    };
    (@cases $deployment:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::redis_cases::$case(&$crate::RedisHarness::new($deployment).await).await;
            }
        )+
    };
}

/// 16 clients (each its own backend and connections) × 200 acquisitions of
/// one key: no overlapping critical sections, tokens strictly increasing.
pub async fn mutual_exclusion_16_clients_200_acquisitions(harness: &RedisHarness) {
    let mut lockers = Vec::new();
    for _ in 0..16 {
        lockers.push(Locker::new(
            harness.deployment().connect().await.expect("connect"),
        ));
    }
    let key = unique_key("checker");
    let report = check_mutual_exclusion(&lockers, &key, CheckerConfig::default().load(16, 200)).await;
    report.assert_clean();
    assert_eq!(report.acquired, 3200);
    assert_eq!(report.history.accepted, 3200);
}

/// 16 clients (each its own backend) × 50 permits of a 4-permit semaphore:
/// never more than 4 inside, tokens unique and increasing.
pub async fn semaphore_16_clients_on_4_permits(harness: &RedisHarness) {
    let mut lockers = Vec::new();
    for _ in 0..16 {
        lockers.push(Locker::new(
            harness.deployment().connect().await.expect("connect"),
        ));
    }
    let key = unique_key("semaphore-checker");
    let config = CheckerConfig::default()
        .load(16, 50)
        .hold(Duration::from_millis(2));
    let report = check_semaphore(&lockers, &key, 4, config).await;
    report.assert_clean();
    assert_eq!(report.acquired, 800);
    assert_eq!(
        report.most_inside, 4,
        "16 clients must fill the 4 permits: {report:#?}"
    );
}

/// 16 clients (each its own backend) × 50 locks of one read-write lock,
/// 90 % reads holding 1 ms: no reader inside with a writer, one writer at
/// a time, tokens unique and increasing.
pub async fn read_write_16_clients_90_percent_reads(harness: &RedisHarness) {
    let mut lockers = Vec::new();
    for _ in 0..16 {
        lockers.push(Locker::new(
            harness.deployment().connect().await.expect("connect"),
        ));
    }
    let key = unique_key("rw-checker");
    let config = CheckerConfig::default()
        .load(16, 50)
        .hold(Duration::from_millis(1));
    let report = check_read_write(&lockers, &key, config).await;
    report.assert_clean();
    assert_eq!(report.reads + report.writes, 800);
    assert!(report.writes > 0 && report.most_readers_inside > 1, "{report:#?}");
}

/// 8 candidates on their own clients campaigning 10 times each, leading
/// for 3 ms: one leader at a time at the fenced resource, terms strictly
/// increasing, every candidate leads, `leader()` and an observer agree.
pub async fn election_8_candidates_lead_in_turn(harness: &RedisHarness) {
    let mut lockers = Vec::new();
    for _ in 0..8 {
        lockers.push(Locker::new(
            harness.deployment().connect().await.expect("connect"),
        ));
    }
    let key = unique_key("election-checker");
    let config = CheckerConfig::default()
        .load(8, 10)
        .hold(Duration::from_millis(3));
    let report = check_election(&lockers, &key, config).await;
    report.assert_clean();
    assert_eq!(report.terms, 80);
}

/// A list at the lock key: `ForeignValue` naming the key; the list stays.
pub async fn a_key_of_another_type_is_reported_and_left_alone(harness: &RedisHarness) {
    let locker = Locker::new(harness.backend().clone());
    let key = unique_key("wrongtype");
    let lock_key = harness.backend().lock_key(&key);
    let mut admin = harness.admin();
    let _: i64 = redis::cmd("LPUSH")
        .arg(&lock_key)
        .arg("precious")
        .query_async(&mut admin)
        .await
        .expect("LPUSH");
    match locker.try_lock(&key).await {
        Err(LockError::ForeignValue { key: reported, .. }) => assert_eq!(reported, key),
        other => panic!("expected ForeignValue, got {other:?}"),
    }
    let kept: Vec<String> = redis::cmd("LRANGE")
        .arg(&lock_key)
        .arg(0)
        .arg(-1)
        .query_async(&mut admin)
        .await
        .expect("LRANGE");
    assert_eq!(kept, vec!["precious".to_owned()]);
}

/// A string dlock did not write: `ForeignValue` (also when waiting), kept.
pub async fn a_foreign_string_is_reported_and_left_alone(harness: &RedisHarness) {
    let locker = Locker::new(harness.backend().clone());
    let key = unique_key("foreign");
    let lock_key = harness.backend().lock_key(&key);
    let mut admin = harness.admin();
    let _: () = redis::cmd("SET")
        .arg(&lock_key)
        .arg("not-a-dlock-owner")
        .query_async(&mut admin)
        .await
        .expect("SET");
    let error = locker
        .lock(&key)
        .wait(std::time::Duration::from_secs(1))
        .await
        .expect_err("foreign value");
    assert!(matches!(error, LockError::ForeignValue { .. }), "{error:?}");
    assert!(error.to_string().contains(&key), "{error}");
    let kept: String = redis::cmd("GET")
        .arg(&lock_key)
        .query_async(&mut admin)
        .await
        .expect("GET");
    assert_eq!(kept, "not-a-dlock-owner");
}

/// A fencing counter that is not a number: `ForeignValue`, and no lock key
/// is left behind (the script undoes its SET).
pub async fn a_broken_fencing_counter_is_reported_and_takes_nothing(harness: &RedisHarness) {
    let locker = Locker::new(harness.backend().clone());
    let key = unique_key("fence");
    let mut admin = harness.admin();
    let _: () = redis::cmd("SET")
        .arg(harness.backend().fence_key(&key))
        .arg("abc")
        .query_async(&mut admin)
        .await
        .expect("SET");
    assert!(matches!(
        locker.try_lock(&key).await,
        Err(LockError::ForeignValue { .. })
    ));
    let exists: i64 = redis::cmd("EXISTS")
        .arg(harness.backend().lock_key(&key))
        .query_async(&mut admin)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "no half-taken lock may stay behind");
}

/// An ACL user limited to `dlock:*` keys and channels can lock; the same
/// user with a wrong password gets `Unavailable` saying authentication
/// failed, and the password shows nowhere.
pub async fn a_wrong_password_is_refused_and_never_shown(harness: &RedisHarness) {
    let user = format!("dlock_test_{}", fastrand::u64(..));
    let mut nodes = harness.deployment().acl_targets().await;
    for node in &mut nodes {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("on")
            .arg(">right-password")
            .arg("~dlock:*")
            .arg("&dlock:*")
            .arg("+@all")
            .query_async(node)
            .await
            .expect("ACL SETUSER");
    }
    let error = harness
        .deployment()
        .builder_as(&user, "wrong-password")
        .connect()
        .await
        .expect_err("wrong password");
    let shown = format!("{error} {error:?}");
    assert!(matches!(error, LockError::Unavailable { .. }), "{error:?}");
    assert!(shown.contains("authentication failed"), "{shown}");
    assert!(!shown.contains("wrong-password"), "the password leaked: {shown}");

    let backend = harness
        .deployment()
        .builder_as(&user, "right-password")
        .connect()
        .await
        .expect("right password");
    let guard = Locker::new(backend)
        .try_lock(unique_key("acl"))
        .await
        .expect("an ACL user limited to dlock:* can lock");
    guard.release().await.expect("release");
    for node in &mut nodes {
        let _: () = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&user)
            .query_async(node)
            .await
            .expect("ACL DELUSER");
    }
}

/// A locker whose waiters renew their places in line every `renewal`.
async fn locker_renewing_every(harness: &RedisHarness, renewal: Duration) -> Locker {
    let backend = harness
        .deployment()
        .builder()
        .waiter_renewal(renewal)
        .connect()
        .await
        .expect("connect");
    Locker::new(backend)
}

/// Puts a waiter that does not exist at the end of `key`'s line, as a
/// waiter whose process died would have left it: its place lasts until
/// `deadline_ms` (server clock, ms) and names a channel nobody reads.
async fn plant_place(harness: &RedisHarness, key: &str, owner: &str, deadline_ms: i64) {
    let mut admin = harness.admin();
    let names = harness.backend();
    let _: i64 = redis::cmd("RPUSH")
        .arg(names.line_key(key))
        .arg(owner)
        .query_async(&mut admin)
        .await
        .expect("RPUSH");
    let _: i64 = redis::cmd("HSET")
        .arg(names.places_key(key))
        .arg(owner)
        .arg(format!("{deadline_ms}:30000:1:dlock:client:nobody"))
        .query_async(&mut admin)
        .await
        .expect("HSET");
}

async fn server_millis(harness: &RedisHarness, key: &str) -> i64 {
    // Routed by the key on a Cluster, so the clock is the key's master's.
    let time: Vec<i64> = redis::cmd("EVAL")
        .arg("local t = redis.call('TIME') return {tonumber(t[1]), tonumber(t[2])}")
        .arg(1)
        .arg(harness.backend().lock_key(key))
        .query_async(&mut harness.admin())
        .await
        .expect("TIME");
    time[0] * 1000 + time[1] / 1000
}

async fn lock_holder(harness: &RedisHarness, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(harness.backend().lock_key(key))
        .query_async(&mut harness.admin())
        .await
        .expect("GET")
}

async fn line(harness: &RedisHarness, key: &str) -> Vec<String> {
    redis::cmd("LRANGE")
        .arg(harness.backend().line_key(key))
        .arg(0)
        .arg(-1)
        .query_async(&mut harness.admin())
        .await
        .expect("LRANGE")
}

/// Polls until `key`'s line is `length` long.
async fn until_line_is(harness: &RedisHarness, key: &str, length: usize) -> Vec<String> {
    let began = Instant::now();
    loop {
        let waiting = line(harness, key).await;
        if waiting.len() == length {
            return waiting;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "the line of {key} is {waiting:?}, expected {length} waiters"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

/// The guard `waiter` gets within `limit`; fails with `what` if it does not.
async fn acquired_within(
    limit: Duration,
    waiter: JoinHandle<Result<LockGuard, LockError>>,
    what: &str,
) -> LockGuard {
    match timeout(limit, waiter).await {
        Ok(Ok(Ok(guard))) => guard,
        Ok(Ok(Err(error))) => panic!("{what}: {error}"),
        Ok(Err(error)) => panic!("{what}: the waiter task failed: {error}"),
        Err(_) => panic!("{what}: not within {limit:?}"),
    }
}

fn wait_for(
    locker: &Locker,
    key: &str,
    ttl: Duration,
    auto_renew: bool,
) -> JoinHandle<Result<LockGuard, LockError>> {
    let (locker, key) = (locker.clone(), key.to_owned());
    tokio::spawn(async move {
        locker
            .lock(&key)
            .ttl(ttl)
            .auto_renew(auto_renew)
            .wait(Duration::from_secs(60))
            .await
    })
}

/// A place nobody renewed for three renewals is skipped: the release hands
/// the lock to the live waiter behind it at once (the skipped waiter would
/// otherwise hold a 30 s reservation).
pub async fn a_waiter_whose_place_ran_out_is_passed_over(harness: &RedisHarness) {
    let locker = locker_renewing_every(harness, Duration::from_secs(10)).await;
    let key = unique_key("passed_over");
    let held = locker.lock(&key).await.expect("lock");
    let past = server_millis(harness, &key).await - 1;
    plant_place(harness, &key, &"d".repeat(32), past).await;
    let waiter = wait_for(&locker, &key, Duration::from_secs(30), true);
    until_line_is(harness, &key, 2).await;
    held.release().await.expect("release");
    let next = acquired_within(
        Duration::from_secs(5),
        waiter,
        "the live waiter gets the lock at once",
    )
    .await;
    assert!(line(harness, &key).await.is_empty(), "the stale place is gone");
    next.release().await.expect("release");
}

/// A waiter that died just after it renewed its place gets the lock handed
/// over, for a reservation of three renewals at most; then the next waiter
/// finds the lock free on its own renewal.
pub async fn a_waiter_that_died_holds_the_line_up_for_its_place_lease_at_most(harness: &RedisHarness) {
    let renewal = Duration::from_millis(200);
    let locker = locker_renewing_every(harness, renewal).await;
    let key = unique_key("dead_waiter");
    let held = locker.lock(&key).await.expect("lock");
    let dead = "e".repeat(32);
    let fresh = server_millis(harness, &key).await + 60_000;
    plant_place(harness, &key, &dead, fresh).await;
    let waiter = wait_for(&locker, &key, Duration::from_secs(30), true);
    until_line_is(harness, &key, 2).await;
    let released_at = Instant::now();
    held.release().await.expect("release");
    assert_eq!(
        lock_holder(harness, &key).await.as_deref(),
        Some(dead.as_str()),
        "the first waiter in line gets the lock"
    );
    let next = acquired_within(
        Duration::from_secs(10),
        waiter,
        "the next waiter gets the lock after the reservation",
    )
    .await;
    let waited = released_at.elapsed();
    // The reservation is three renewals (600 ms); the waiter renews every
    // 200 ms (plus jitter).
    assert!(
        waited >= renewal * 2,
        "got the lock after {waited:?}, inside the reservation"
    );
    assert!(waited < renewal * 3 + Duration::from_secs(2), "waited {waited:?}");
    next.release().await.expect("release");
}

/// A hand-over whose message never arrives: the waiter finds the lock
/// handed to it on its next renewal (the holder's TTL is 30 s, so nothing
/// else gets it the lock within the bound).
pub async fn a_lost_hand_over_message_is_made_up_for_by_the_renewal(harness: &RedisHarness) {
    let holder = locker_renewing_every(harness, Duration::from_secs(1)).await;
    let waiting = locker_renewing_every(harness, Duration::from_secs(1)).await;
    let key = unique_key("lost_message");
    let held = holder
        .lock(&key)
        .ttl(Duration::from_secs(30))
        .await
        .expect("lock");
    let waiter = wait_for(&waiting, &key, Duration::from_secs(30), true);
    let owner = until_line_is(harness, &key, 1).await.remove(0);
    // Once the waiter's place is its second attempt (it looks again right
    // after it subscribed), it sleeps until its renewal: redirect the
    // hand-over message to a channel nobody reads.
    let places = harness.backend().places_key(&key);
    let began = Instant::now();
    let place = loop {
        let place: String = redis::cmd("HGET")
            .arg(&places)
            .arg(&owner)
            .query_async(&mut harness.admin())
            .await
            .expect("HGET");
        let fields: Vec<String> = place.splitn(4, ':').map(str::to_owned).collect();
        if fields.get(2).is_some_and(|attempt| attempt == "1") {
            break fields;
        }
        assert!(began.elapsed() < Duration::from_secs(10), "place {place}");
        sleep(Duration::from_millis(5)).await;
    };
    let _: i64 = redis::cmd("HSET")
        .arg(&places)
        .arg(&owner)
        .arg(format!("{}:{}:1:dlock:client:nobody", place[0], place[1]))
        .query_async(&mut harness.admin())
        .await
        .expect("HSET");
    let token = held.fencing_token();
    held.release().await.expect("release");
    assert_eq!(lock_holder(harness, &key).await, Some(owner), "handed over");
    let next = acquired_within(
        Duration::from_secs(4),
        waiter,
        "the renewal finds the lock handed over",
    )
    .await;
    assert!(next.fencing_token() > token);
    next.release().await.expect("release");
}

/// A lock handed over lasts its TTL: with auto-renewal beyond the short
/// reservation it was handed over with; without, the waiter's round trip
/// sets the full TTL before it returns.
pub async fn a_handed_over_lock_lasts_its_ttl(harness: &RedisHarness) {
    // Reservations are 600 ms.
    let locker = locker_renewing_every(harness, Duration::from_millis(200)).await;
    let ttl = Duration::from_secs(3);
    for auto_renew in [true, false] {
        let key = unique_key("handed_over_ttl");
        let held = locker.lock(&key).await.expect("lock");
        let waiter = wait_for(&locker, &key, ttl, auto_renew);
        until_line_is(harness, &key, 1).await;
        held.release().await.expect("release");
        let next = acquired_within(Duration::from_secs(5), waiter, "handed over").await;
        sleep(Duration::from_millis(1500)).await;
        assert!(
            next.is_held(),
            "auto-renew {auto_renew}: lost after the reservation"
        );
        let left: i64 = redis::cmd("PTTL")
            .arg(harness.backend().lock_key(&key))
            .query_async(&mut harness.admin())
            .await
            .expect("PTTL");
        assert!(
            left > 1000,
            "auto-renew {auto_renew}: {left} ms left on the server"
        );
        next.release().await.expect("release");
    }
}
