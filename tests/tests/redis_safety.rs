//! The Redis side of the safety review (issue: double holders and stuck
//! waiters): key names whose hash tag would be empty, hand-overs between
//! clients with different settings, line keys of another type, and a
//! pub/sub connection cut again and again while waiters wait.

use std::time::Duration;

use dlock_core::{LockError, LockGuard, Locker};
use dlock_redis::RedisBackend;
use dlock_servers::redis as servers;
use dlock_testkit::conformance::unique_key;
use dlock_tests::{RedisDeployment, RedisHarness};
use tokio::task::{JoinHandle, spawn_blocking};
use tokio::time::{Instant, sleep, timeout};

fn deployments() -> [RedisDeployment; 3] {
    [
        RedisDeployment::single_from_env(),
        RedisDeployment::cluster_from_env(),
        RedisDeployment::sentinel_from_env(),
    ]
}

async fn locker(deployment: &RedisDeployment, waiter_renewal: Duration) -> Locker {
    let backend = deployment
        .builder()
        .waiter_renewal(waiter_renewal)
        .connect()
        .await
        .expect("connect");
    Locker::new(backend)
}

fn wait_in_task(locker: &Locker, key: &str, ttl: Duration) -> JoinHandle<Result<LockGuard, LockError>> {
    let (locker, key) = (locker.clone(), key.to_owned());
    tokio::spawn(async move { locker.lock(&key).ttl(ttl).wait(Duration::from_secs(30)).await })
}

async fn line_length(harness: &RedisHarness, key: &str) -> usize {
    let length: i64 = redis::cmd("LLEN")
        .arg(harness.backend().line_key(key))
        .query_async(&mut harness.admin())
        .await
        .unwrap_or(0);
    usize::try_from(length).unwrap_or(0)
}

async fn until_line_is(harness: &RedisHarness, key: &str, length: usize) {
    let began = Instant::now();
    while line_length(harness, key).await != length {
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{key}: the line never reached {length}"
        );
        sleep(Duration::from_millis(10)).await;
    }
}

async fn got(waiter: JoinHandle<Result<LockGuard, LockError>>, what: &str) -> LockGuard {
    match timeout(Duration::from_secs(20), waiter).await {
        Ok(Ok(Ok(guard))) => guard,
        other => panic!("{what}: {other:?}"),
    }
}

/// Keys whose first `{`…`}` pair would be empty (a key starting with `}`)
/// put the lock and its counter in one slot like any other key: lock,
/// extend, wait in line, hand over and release work on every deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_braces_work_on_every_deployment() {
    for deployment in deployments() {
        let holder = locker(&deployment, Duration::from_millis(200)).await;
        let waiting = locker(&deployment, Duration::from_millis(200)).await;
        for shape in ["}", "}leading", "{}", "a{}b", "{x}", "}{", "{", "a}b{c"] {
            let key = format!("{shape}{}", unique_key("braces"));
            for key in [key.clone(), format!("}}{key}")] {
                let held = holder
                    .lock(&key)
                    .ttl(Duration::from_secs(5))
                    .await
                    .unwrap_or_else(|error| panic!("{deployment:?} {key:?}: {error}"));
                held.extend(Duration::from_secs(5))
                    .await
                    .unwrap_or_else(|error| panic!("{deployment:?} {key:?}: extend: {error}"));
                let waiter = wait_in_task(&waiting, &key, Duration::from_secs(5));
                sleep(Duration::from_millis(50)).await;
                held.release()
                    .await
                    .unwrap_or_else(|error| panic!("{deployment:?} {key:?}: release: {error}"));
                let next = got(waiter, &format!("{deployment:?} {key:?}: hand-over")).await;
                next.release().await.expect("release");
            }
        }
    }
}

/// A releaser whose waiters renew every 100 ms sets a 300 ms reservation;
/// a waiter whose own setting would have it believe 3 s must count from
/// what the server set: it renews in time, and no third client gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_over_lasts_what_the_releaser_set_whatever_the_waiter_thinks() {
    for deployment in deployments() {
        let harness = RedisHarness::new(deployment.clone()).await;
        let releaser = locker(&deployment, Duration::from_millis(100)).await;
        let waiting = locker(&deployment, Duration::from_secs(1)).await;
        let third = locker(&deployment, Duration::from_secs(1)).await;
        let key = unique_key("mixed_settings");
        let held = releaser
            .lock(&key)
            .ttl(Duration::from_secs(10))
            .await
            .expect("lock");
        let waiter = wait_in_task(&waiting, &key, Duration::from_secs(10));
        until_line_is(&harness, &key, 1).await;
        // Past the waiter's first look: it now sleeps until a message.
        sleep(Duration::from_millis(300)).await;
        held.release().await.expect("release");
        let next = got(waiter, "handed over").await;
        for _ in 0..10 {
            sleep(Duration::from_millis(100)).await;
            match third.try_lock(&key).await {
                Err(LockError::Contended { .. }) => {}
                other => panic!(
                    "{deployment:?}: a third client got {other:?} while the waiter believes it holds the lock (held: {})",
                    next.is_held()
                ),
            }
        }
        assert!(next.is_held(), "{deployment:?}");
        next.release().await.expect("release");
    }
}

/// A line key of another type does not turn a taken lock into an error
/// that leaves the lock behind: the waiter gets the lock, and its release
/// frees it (the foreign value is left as it was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_line_key_leaves_no_lock_behind() {
    let deployment = RedisDeployment::single_from_env();
    let harness = RedisHarness::new(deployment.clone()).await;
    let holder = locker(&deployment, Duration::from_millis(100)).await;
    let waiting = locker(&deployment, Duration::from_millis(100)).await;
    let key = unique_key("foreign_line");
    let held = holder
        .lock(&key)
        .ttl(Duration::from_millis(600))
        .auto_renew(false)
        .await
        .expect("lock");
    let waiter = wait_in_task(&waiting, &key, Duration::from_secs(5));
    until_line_is(&harness, &key, 1).await;
    let line_key = harness.backend().line_key(&key);
    let _: () = redis::cmd("SET")
        .arg(&line_key)
        .arg("not a line")
        .query_async(&mut harness.admin())
        .await
        .expect("SET");
    // The holder's lease runs out; the waiter's next look takes the lock.
    let next = got(waiter, "the waiter takes the expired lock").await;
    assert!(next.fencing_token() > held.fencing_token());
    next.release().await.expect("release");
    let lock: Option<String> = redis::cmd("GET")
        .arg(harness.backend().lock_key(&key))
        .query_async(&mut harness.admin())
        .await
        .expect("GET");
    assert_eq!(lock, None, "the lock is gone after the release");
    let foreign: String = redis::cmd("GET")
        .arg(&line_key)
        .query_async(&mut harness.admin())
        .await
        .expect("GET");
    assert_eq!(foreign, "not a line");
    drop(held);
}

fn evalsha_calls(port: u16) -> u64 {
    let stats = servers::command(port, &["INFO", "commandstats"])
        .expect("INFO commandstats")
        .text();
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|calls| calls.parse().ok())
        .unwrap_or(0)
}

/// The pub/sub connection cut again and again while waiters wait: once
/// the cuts stop, waiters look at the lock about once per waiter renewal,
/// not once per round trip (a `connected` flag stuck at false made every
/// waiter send its script again at once), and a release still hands over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pub_sub_cuts_leave_no_waiter_spinning() {
    let server = match spawn_blocking(|| servers::start_server("redis-pubsub-cuts", &[])).await {
        Ok(Ok(server)) => server,
        Ok(Err(message)) => panic!("{message}"),
        Err(error) => panic!("server setup panicked: {error}"),
    };
    let port = server.port();
    let url = format!("{}/0", servers::url(port));
    let renewal = Duration::from_millis(200);
    let connect = || async {
        Locker::new(
            RedisBackend::builder(&url)
                .waiter_renewal(renewal)
                .connect()
                .await
                .expect("connect"),
        )
    };
    let holder = connect().await;
    let key = "pubsub-cuts";
    let held = holder.lock(key).ttl(Duration::from_secs(60)).await.expect("lock");
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let client = connect().await;
        for _ in 0..4 {
            let client = client.clone();
            waiters.push(tokio::spawn(async move {
                let guard = client.lock(key).wait(Duration::from_secs(60)).await?;
                guard.release().await
            }));
        }
    }
    sleep(Duration::from_millis(500)).await;
    for round in 0..400 {
        spawn_blocking(move || servers::command(port, &["CLIENT", "KILL", "TYPE", "pubsub"]))
            .await
            .expect("task")
            .expect("CLIENT KILL");
        sleep(Duration::from_millis(1 + round % 5)).await;
    }
    sleep(Duration::from_secs(2)).await;
    let before = evalsha_calls(port);
    let measured = Duration::from_secs(2);
    sleep(measured).await;
    let calls = evalsha_calls(port) - before;
    // 12 waiters, each renewing its place every 200 ms: about 120 in 2 s.
    let expected = 12 * (measured.as_millis() / renewal.as_millis()) as u64;
    assert!(
        calls <= 3 * expected,
        "{calls} scripts in {measured:?} from 12 waiters renewing every {renewal:?} (about {expected} expected)"
    );
    held.release().await.expect("release");
    for waiter in waiters {
        match timeout(Duration::from_secs(30), waiter).await {
            Ok(Ok(Ok(()))) => {}
            other => panic!("every waiter gets its turn and releases: {other:?}"),
        }
    }
    drop(server);
}

/// A semaphore waiter that gives up when the key has no permits left (they
/// all ran out) must not hand the next waiter a mutex's lock: the key stays
/// a semaphore's, and the next waiter takes a permit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_semaphore_waiter_hands_over_no_mutex() {
    let deployment = RedisDeployment::single_from_env();
    let harness = RedisHarness::new(deployment.clone()).await;
    let holder = locker(&deployment, Duration::from_secs(1)).await;
    let waiting = locker(&deployment, Duration::from_secs(1)).await;
    let giving_up = locker(&deployment, Duration::from_secs(1)).await;
    let key = unique_key("semaphore_abandon");
    let held = holder
        .semaphore(&key, 1)
        .ttl(Duration::from_secs(30))
        .await
        .expect("the permit");
    let waiter = {
        let (waiting, key) = (waiting.clone(), key.clone());
        tokio::spawn(async move { waiting.semaphore(&key, 1).wait(Duration::from_secs(20)).await })
    };
    let cancelled = {
        let (giving_up, key) = (giving_up.clone(), key.clone());
        tokio::spawn(async move { giving_up.semaphore(&key, 1).wait(Duration::from_secs(20)).await })
    };
    until_line_is(&harness, &key, 2).await;
    // Every permit runs out at once (as if the holder had crashed long ago).
    let lock_key = harness.backend().lock_key(&key);
    let _: i64 = redis::cmd("DEL")
        .arg(&lock_key)
        .query_async(&mut harness.admin())
        .await
        .expect("DEL");
    cancelled.abort();
    let _ = cancelled.await;
    giving_up.wait_for_cleanup().await;
    let kind: String = redis::cmd("TYPE")
        .arg(&lock_key)
        .query_async(&mut harness.admin())
        .await
        .expect("TYPE");
    assert_ne!(kind, "string", "a mutex's lock was handed to a semaphore waiter");
    let permit = got(waiter, "the waiter takes a permit").await;
    assert!(permit.fencing_token() > held.fencing_token());
    permit.release().await.expect("release");
    held.forget();
}
