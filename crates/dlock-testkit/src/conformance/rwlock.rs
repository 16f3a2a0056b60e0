//! Checks of the read-write lock: `read_lock(key)` readers share the key,
//! `lock(key)` is the writer, writers are preferred. On a backend without
//! read locks ([`SuiteConfig::read_write`](super::SuiteConfig::read_write)
//! off) each check asserts the typed `Unsupported` answer instead.

use std::time::Duration;

use dlock_core::{LockError, LockGuard, Locker};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use super::{Harness, LONG_TTL, unique_key, until_nothing_left};

/// On a backend that does not offer read locks: the request is refused as
/// `Unsupported` and leaves nothing. Returns true when the check must stop.
async fn unsupported_here(harness: &dyn Harness, locker: &Locker, key: &str) -> bool {
    if harness.config().read_write {
        return false;
    }
    match locker.read_lock(key).try_lock().await {
        Err(LockError::Unsupported { what, .. }) => assert!(what.contains("read"), "{what}"),
        other => panic!("a backend without read locks must answer Unsupported, got {other:?}"),
    }
    until_nothing_left(harness, key, "a refused read lock left state behind").await;
    true
}

/// A reader (or, `writing`, the writer) on its own client that waits (up
/// to 25 s) in a task; yields the outcome and when it came.
async fn waiting_in_task(
    harness: &dyn Harness,
    key: &str,
    writing: bool,
) -> JoinHandle<(Result<LockGuard, LockError>, Instant)> {
    let client = harness.locker().await;
    let key = key.to_owned();
    tokio::spawn(async move {
        let request = if writing {
            client.lock(&key)
        } else {
            client.read_lock(&key)
        };
        let guard = request.ttl(LONG_TTL).wait(Duration::from_secs(25)).await;
        (guard, Instant::now())
    })
}

/// Readers on several clients hold the key together, each with a token
/// above every token before it; a writer is `Contended` while any of them
/// reads, and gets in, with a higher token, once all have left.
pub async fn readers_share_a_key(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("readers_share_a_key");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let mut readers: Vec<LockGuard> = Vec::new();
    for _ in 0..3 {
        let client = harness.locker().await;
        let reader = client
            .read_lock(&key)
            .ttl(LONG_TTL)
            .try_lock()
            .await
            .expect("readers share the key");
        if let Some(last) = readers.last() {
            assert!(
                reader.fencing_token() > last.fencing_token(),
                "tokens must increase"
            );
        }
        readers.push(reader);
    }
    let writer = harness.locker().await;
    while let Some(reader) = readers.pop() {
        match writer.try_lock(&key).await {
            Err(LockError::Contended { key: reported }) => assert_eq!(reported, key),
            other => panic!(
                "a writer while {} readers read: expected Contended, got {other:?}",
                readers.len() + 1
            ),
        }
        let token = reader.fencing_token();
        reader.release().await.expect("release a reader");
        assert!(
            readers.iter().all(LockGuard::is_held),
            "a reader's release frees only its own lease"
        );
        if readers.is_empty() {
            let written = writer
                .try_lock(&key)
                .await
                .expect("the writer gets in once every reader left");
            assert!(written.fencing_token() > token);
            written.release().await.expect("release");
        }
    }
    until_nothing_left(harness, &key, "released readers left state behind").await;
}

/// A writer keeps readers and other writers out; the readers that wait
/// behind it are admitted together when it releases (all within the wake
/// bound: one notification, not one release each).
pub async fn writer_excludes_readers_and_writers(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("writer_excludes_readers_and_writers");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let writer = locker.lock(&key).ttl(LONG_TTL).await.expect("the writer");
    let other = harness.locker().await;
    assert!(matches!(
        other.read_lock(&key).try_lock().await,
        Err(LockError::Contended { .. })
    ));
    assert!(matches!(
        other.try_lock(&key).await,
        Err(LockError::Contended { .. })
    ));
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(waiting_in_task(harness, &key, false).await);
    }
    sleep(Duration::from_millis(300)).await;
    assert!(
        waiting.iter().all(|reader| !reader.is_finished()),
        "readers wait for the writer"
    );
    let released_at = Instant::now();
    let token = writer.fencing_token();
    writer.release().await.expect("release the writer");
    let bound = harness.config().wake_bound;
    let mut readers = Vec::new();
    for reader in waiting {
        let (guard, acquired_at) = reader.await.expect("reader task");
        let guard = guard.expect("a waiting reader gets in when the writer leaves");
        assert!(
            acquired_at - released_at < bound,
            "a reader took {:?} after the writer's release (bound {bound:?}): not woken by a notification",
            acquired_at - released_at
        );
        assert!(guard.fencing_token() > token);
        readers.push(guard);
    }
    assert!(
        readers.iter().all(LockGuard::is_held),
        "the readers hold together"
    );
    for reader in readers {
        reader.release().await.expect("release");
    }
    until_nothing_left(harness, &key, "the read-write lock left state behind").await;
}

/// A waiting writer stays out while any reader reads, and the last
/// reader's release wakes it at once (within the wake bound).
pub async fn last_reader_wakes_the_writer(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("last_reader_wakes_the_writer");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let first = locker.read_lock(&key).ttl(LONG_TTL).await.expect("reader 1");
    let second = harness
        .locker()
        .await
        .read_lock(&key)
        .ttl(LONG_TTL)
        .await
        .expect("reader 2");
    let writer = waiting_in_task(harness, &key, true).await;
    sleep(Duration::from_millis(300)).await;
    first.release().await.expect("release reader 1");
    sleep(Duration::from_millis(300)).await;
    assert!(!writer.is_finished(), "the writer waits while a reader reads");
    let released_at = Instant::now();
    let last_reader = second.fencing_token();
    second.release().await.expect("release reader 2");
    let (guard, acquired_at) = writer.await.expect("writer task");
    let guard = guard.expect("the writer gets in after the last reader");
    let bound = harness.config().wake_bound;
    assert!(
        acquired_at - released_at < bound,
        "the writer took {:?} after the last reader left (bound {bound:?}): not woken by a notification",
        acquired_at - released_at
    );
    assert!(guard.fencing_token() > last_reader);
    guard.release().await.expect("release");
    until_nothing_left(harness, &key, "the read-write lock left state behind").await;
}

/// Writer preference: once a writer waits, a new reader is kept out even
/// though only readers hold the key; with readers arriving continuously
/// (each reading for a while, always one inside), the waiting writer gets
/// in once the readers that were inside before it have left.
pub async fn waiting_writer_is_not_starved(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("waiting_writer_is_not_starved");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let hold = Duration::from_millis(400);
    let stop = Instant::now() + Duration::from_secs(20);
    // Two readers a hold apart: one is always inside, on its own client.
    let stream = {
        let lockers = [harness.locker().await, harness.locker().await];
        let key = key.clone();
        tokio::spawn(async move {
            let mut turns = 0usize;
            let mut inside: Vec<JoinHandle<()>> = Vec::new();
            while Instant::now() < stop {
                let reader = lockers[turns % 2].clone();
                let key = key.clone();
                inside.push(tokio::spawn(async move {
                    if let Ok(guard) = reader
                        .read_lock(&key)
                        .ttl(LONG_TTL)
                        .wait(Duration::from_secs(25))
                        .await
                    {
                        sleep(hold).await;
                        let _ = guard.release().await;
                    }
                }));
                turns += 1;
                sleep(hold / 2).await;
            }
            for reader in inside {
                let _ = reader.await;
            }
        })
    };
    sleep(hold * 2).await;
    let asked_at = Instant::now();
    let writer = waiting_in_task(harness, &key, true).await;
    sleep(Duration::from_millis(150)).await;
    if !writer.is_finished() {
        match harness.locker().await.read_lock(&key).try_lock().await {
            Err(LockError::Contended { .. }) => {}
            other => panic!("a reader that comes while a writer waits must queue behind it, got {other:?}"),
        }
    }
    let (guard, acquired_at) = writer.await.expect("writer task");
    let guard = guard.expect("the writer gets in despite the stream of readers");
    let waited = acquired_at - asked_at;
    let bound = hold * 2 + harness.config().wake_bound * 2;
    assert!(
        waited < bound,
        "the writer waited {waited:?} with readers arriving every {:?} (bound {bound:?}): writers are starved",
        hold / 2
    );
    guard.release().await.expect("release");
    stream.abort();
    let _ = stream.await;
    sleep(hold).await;
}

/// Each reader is its own lease: a reader that stops renewing (a crash)
/// keeps writers out for its own TTL at most, and its end takes nothing
/// from the reader that renews.
pub async fn crashed_reader_frees_within_its_ttl(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("crashed_reader_frees_within_its_ttl");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let short = harness.config().short_ttl;
    let lasting = locker.read_lock(&key).ttl(short).await.expect("a renewed reader");
    let crashed = harness.locker().await;
    let dead = crashed.read_lock(&key).ttl(short).await.expect("a reader");
    let dead_token = dead.fencing_token();
    let crashed_at = Instant::now();
    dead.forget(); // the reader crashes: no release, no renewal
    sleep(short * 2).await;
    assert!(
        lasting.is_held(),
        "the renewed reader must outlive the crashed one"
    );
    lasting.release().await.expect("release");
    let writer = harness.locker().await;
    let guard = writer
        .lock(&key)
        .ttl(LONG_TTL)
        .wait(short * 4)
        .await
        .expect("the crashed reader's lease must end within its TTL");
    assert!(
        Instant::now() - crashed_at < short * 4,
        "the writer got in {:?} after the reader crashed (TTL {short:?})",
        Instant::now() - crashed_at
    );
    assert!(guard.fencing_token() > dead_token);
    guard.release().await.expect("release");
}

/// Cancelled waiters leave nothing: a writer that gives up while readers
/// read lets new readers in at once (no place of it keeps them out), and a
/// reader that gives up behind a writer leaves no lease once it releases.
pub async fn rw_cancelled_waiters_leave_nothing(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("rw_cancelled_waiters_leave_nothing");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let reader = locker.read_lock(&key).ttl(LONG_TTL).await.expect("a reader");
    let writer = harness.locker().await;
    let gave_up = timeout(Duration::from_millis(300), writer.lock(&key)).await;
    assert!(gave_up.is_err(), "the writer must still be waiting when dropped");
    writer.wait_for_cleanup().await;
    let give_up_at = Instant::now() + Duration::from_secs(5);
    let second = loop {
        match harness
            .locker()
            .await
            .read_lock(&key)
            .ttl(LONG_TTL)
            .try_lock()
            .await
        {
            Ok(second) => break second,
            Err(LockError::Contended { .. }) if Instant::now() < give_up_at => {
                sleep(Duration::from_millis(20)).await;
            }
            other => panic!("a cancelled writer must not keep readers out, got {other:?}"),
        }
    };
    second.release().await.expect("release");
    reader.release().await.expect("release");
    until_nothing_left(harness, &key, "a cancelled writer left state behind").await;

    let holder = locker.lock(&key).ttl(LONG_TTL).await.expect("the writer");
    let gave_up = timeout(Duration::from_millis(300), writer.read_lock(&key)).await;
    assert!(gave_up.is_err(), "the reader must still be waiting when dropped");
    holder.release().await.expect("release");
    until_nothing_left(harness, &key, "a cancelled reader left state behind").await;
}

/// A key read-locked is refused as a semaphore and the other way round,
/// with `WrongKind`; a mutex's key is a read-write lock's (a reader there
/// waits for it, it is never refused).
pub async fn read_locks_and_semaphores_do_not_mix(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("read_locks_and_semaphores_do_not_mix");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let reader = locker.read_lock(&key).ttl(LONG_TTL).await.expect("a reader");
    if harness.config().semaphores {
        match locker.semaphore(&key, 2).try_lock().await {
            Err(LockError::WrongKind {
                held_as, asked_as, ..
            }) => {
                assert!(
                    held_as.contains("read") && asked_as.contains("semaphore"),
                    "{held_as} / {asked_as}"
                );
            }
            other => panic!("a semaphore on a read lock's key: expected WrongKind, got {other:?}"),
        }
    }
    reader.release().await.expect("release");
    until_nothing_left(harness, &key, "the reader left state behind").await;
    if harness.config().semaphores {
        let permit = locker.semaphore(&key, 2).ttl(LONG_TTL).await.expect("a permit");
        match locker.read_lock(&key).try_lock().await {
            Err(LockError::WrongKind {
                held_as, asked_as, ..
            }) => {
                assert!(
                    held_as.contains("semaphore") && asked_as.contains("read"),
                    "{held_as} / {asked_as}"
                );
            }
            other => panic!("a read lock on a semaphore's key: expected WrongKind, got {other:?}"),
        }
        let waited = timeout(Duration::from_secs(5), locker.read_lock(&key).wait(LONG_TTL))
            .await
            .expect("a kind mismatch must not wait");
        assert!(matches!(waited, Err(LockError::WrongKind { .. })), "{waited:?}");
        permit.release().await.expect("release");
        until_nothing_left(harness, &key, "the semaphore left state behind").await;
    }
    let mutex = locker.lock(&key).ttl(LONG_TTL).await.expect("the mutex");
    match locker.read_lock(&key).try_lock().await {
        Err(LockError::Contended { .. }) => {}
        other => panic!("a reader on a mutex's key waits for it: expected Contended, got {other:?}"),
    }
    mutex.release().await.expect("release");
}

/// No upgrade: the task that holds a read lock and awaits the write lock
/// with no wait limit is refused at once with `UpgradeRefused` (it would
/// wait for itself); its `try_lock` is `Contended`; a writer in another
/// task waits as usual and gets in once the reader leaves.
pub async fn upgrade_is_refused(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("upgrade_is_refused");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let reader = locker.read_lock(&key).ttl(LONG_TTL).await.expect("a reader");
    let upgrade = timeout(Duration::from_secs(5), locker.lock(&key))
        .await
        .expect("an upgrade must be refused, not wait");
    match upgrade {
        Err(LockError::UpgradeRefused { key: reported }) => assert_eq!(reported, key),
        other => panic!("expected UpgradeRefused, got {other:?}"),
    }
    assert!(matches!(
        locker.try_lock(&key).await,
        Err(LockError::Contended { .. })
    ));
    let writer = {
        let locker = locker.clone();
        let key = key.clone();
        tokio::spawn(async move { locker.lock(&key).ttl(LONG_TTL).await })
    };
    sleep(Duration::from_millis(300)).await;
    assert!(
        !writer.is_finished(),
        "a writer in another task waits for the reader"
    );
    reader.release().await.expect("release");
    let guard = timeout(Duration::from_secs(10), writer)
        .await
        .expect("the writer gets in once the reader left")
        .expect("writer task")
        .expect("the write lock");
    guard.release().await.expect("release");
    until_nothing_left(harness, &key, "the read-write lock left state behind").await;
}
