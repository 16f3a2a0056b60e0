//! Checks of leases: expiry, renewal, extend, loss detection, fencing.

use std::time::Duration;

use dlock_core::{FencingToken, LockError, NotHeldReason};
use tokio::time::{Instant, sleep, timeout};

use super::{Harness, LONG_TTL, unique_key};

/// A lease that is neither renewed nor released frees the key after its TTL.
pub async fn ttl_expiry_frees_key(harness: &dyn Harness) {
    let crashed = harness.locker().await;
    let waiter = harness.locker().await;
    let key = unique_key("ttl_expiry_frees_key");
    let ttl = harness.config().short_ttl;
    let started = Instant::now();
    let guard = crashed
        .lock(&key)
        .ttl(ttl)
        .auto_renew(false)
        .await
        .expect("acquire");
    let first = guard.fencing_token();
    guard.forget(); // as if the process died
    let next = waiter
        .lock(&key)
        .wait(ttl * 5)
        .await
        .expect("the key frees itself after the TTL");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= ttl * 9 / 10,
        "acquired after {elapsed:?}, before the TTL of {ttl:?} ran out"
    );
    assert!(next.fencing_token() > first);
    next.release().await.expect("release");
}

/// A forgotten guard whose lock was auto-renewed stops renewing: the key
/// frees itself after the TTL, as if the holder's process had died (even
/// where the backend keeps a shared lease alive for its other locks).
pub async fn forgotten_renewed_lock_expires(harness: &dyn Harness) {
    let crashed = harness.locker().await;
    let waiter = harness.locker().await;
    let key = unique_key("forgotten_renewed_lock_expires");
    let ttl = harness.config().short_ttl;
    // Something else stays held, so that a backend's shared lease stays alive.
    let other = crashed
        .lock(format!("{key}/other"))
        .ttl(ttl)
        .await
        .expect("acquire the other key");
    let started = Instant::now();
    let guard = crashed.lock(&key).ttl(ttl).await.expect("acquire");
    let first = guard.fencing_token();
    guard.forget();
    let next = waiter
        .lock(&key)
        .wait(ttl * 5)
        .await
        .expect("the forgotten lock frees itself after the TTL");
    assert!(
        started.elapsed() >= ttl * 9 / 10,
        "acquired after {:?}, before the TTL of {ttl:?} ran out",
        started.elapsed()
    );
    assert!(next.fencing_token() > first);
    next.release().await.expect("release");
    other.release().await.expect("release the other key");
}

/// Auto-renewal keeps a lock for several TTLs.
pub async fn renewal_keeps_lock(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let other = harness.locker().await;
    let key = unique_key("renewal_keeps_lock");
    let ttl = harness.config().short_ttl;
    let guard = holder.lock(&key).ttl(ttl).await.expect("acquire");
    sleep(ttl * 3).await;
    assert!(guard.is_held(), "renewal must keep the lock past its TTL");
    assert!(
        matches!(other.try_lock(&key).await, Err(LockError::Contended { .. })),
        "the renewed lock must still exclude others"
    );
    guard.release().await.expect("a renewed lock releases cleanly");
}

/// Without auto-renewal the guard turns lost when its TTL runs out.
pub async fn unrenewed_guard_turns_lost(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("unrenewed_guard_turns_lost");
    let ttl = harness.config().short_ttl;
    let guard = locker
        .lock(&key)
        .ttl(ttl)
        .auto_renew(false)
        .await
        .expect("acquire");
    timeout(ttl * 2, guard.lost())
        .await
        .expect("lost() must resolve when the TTL runs out");
    assert!(!guard.is_held());
    // The guard gives up a little before the server does (drift allowance);
    // once the server's lease is over too, a release finds nothing.
    sleep(ttl / 2).await;
    match guard.release().await {
        Err(LockError::NotHeld { reason, .. }) => assert_eq!(reason, NotHeldReason::Expired),
        other => panic!("expected NotHeld after expiry, got {other:?}"),
    }
}

/// `extend` moves the lease's end, checked by the owner.
pub async fn extend_moves_deadline(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let other = harness.locker().await;
    let key = unique_key("extend_moves_deadline");
    let ttl = harness.config().short_ttl;
    let guard = holder
        .lock(&key)
        .ttl(ttl)
        .auto_renew(false)
        .await
        .expect("acquire");
    guard.extend(ttl * 4).await.expect("extend a held lock");
    sleep(ttl * 2).await;
    assert!(guard.is_held(), "the extension must hold past the first TTL");
    assert!(matches!(
        other.try_lock(&key).await,
        Err(LockError::Contended { .. })
    ));
    guard.release().await.expect("release");
}

/// A lease ended behind the holder's back is noticed within its TTL.
pub async fn loss_detected_on_force_expiry(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("loss_detected_on_force_expiry");
    let ttl = harness.config().short_ttl;
    let guard = locker.lock(&key).ttl(ttl).await.expect("acquire");
    harness.force_expire(&key).await;
    timeout(ttl * 2, guard.lost())
        .await
        .expect("lost() must resolve within the TTL");
    assert!(!guard.is_held());
    assert!(matches!(guard.extend(ttl).await, Err(LockError::Lost { .. })));
    match guard.release().await {
        Err(LockError::NotHeld { reason, .. }) => assert_eq!(reason, NotHeldReason::Expired),
        other => panic!("expected NotHeld, got {other:?}"),
    }
}

/// After a foreign takeover the old holder learns of its loss, its release
/// fails with `NotHeld`, and the new holder keeps the lock.
pub async fn loss_detected_on_takeover(harness: &dyn Harness) {
    let old = harness.locker().await;
    let new = harness.locker().await;
    let third = harness.locker().await;
    let key = unique_key("loss_detected_on_takeover");
    let ttl = harness.config().short_ttl;
    let stale = old.lock(&key).ttl(ttl).await.expect("acquire");
    harness.force_expire(&key).await;
    let current = new
        .lock(&key)
        .ttl(LONG_TTL)
        .wait(ttl * 2)
        .await
        .expect("take over");
    assert!(current.fencing_token() > stale.fencing_token());
    timeout(ttl * 2, stale.lost())
        .await
        .expect("the old holder must learn of the loss");
    match stale.release().await {
        Err(LockError::NotHeld { reason, .. }) => assert_eq!(reason, NotHeldReason::OtherOwner),
        other => panic!("a non-owner's release must fail with NotHeld, got {other:?}"),
    }
    assert!(
        matches!(third.try_lock(&key).await, Err(LockError::Contended { .. })),
        "a failed foreign release must not free the key"
    );
    assert!(current.is_held());
    current.release().await.expect("the new holder releases");
}

/// `with_lock` drops the critical section when the lock is lost and reports `Lost`.
pub async fn with_lock_stops_on_loss(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("with_lock_stops_on_loss");
    let ttl = harness.config().short_ttl;
    let started = Instant::now();
    let outcome = locker
        .lock(&key)
        .ttl(ttl)
        .with_lock(async |guard| {
            harness.force_expire(guard.key()).await;
            sleep(ttl * 20).await;
            "finished"
        })
        .await;
    assert!(matches!(outcome, Err(LockError::Lost { .. })), "got {outcome:?}");
    assert!(
        started.elapsed() < ttl * 5,
        "the critical section was not stopped in time"
    );
    let value = locker
        .with_lock(&key, async |guard| guard.fencing_token())
        .await
        .expect("with_lock on a free key");
    assert!(value.get() > 0);
    assert_eq!(harness.leftovers(&key).await, 0, "with_lock must release");
}

/// Tokens strictly increase across clients, releases, expiries and takeovers.
pub async fn fencing_tokens_increase(harness: &dyn Harness) {
    let mut lockers = Vec::new();
    for _ in 0..3 {
        lockers.push(harness.locker().await);
    }
    let key = unique_key("fencing_tokens_increase");
    let mut previous = None;
    for round in 0..30 {
        let locker = &lockers[round % lockers.len()];
        let guard = locker
            .lock(&key)
            .ttl(LONG_TTL)
            .wait(LONG_TTL)
            .await
            .expect("acquire");
        let token = guard.fencing_token();
        if let Some(previous) = previous {
            assert!(token > previous, "round {round}: token {token} after {previous}");
        }
        previous = Some(token);
        if round % 5 == 4 {
            harness.force_expire(&key).await;
            drop(guard);
        } else {
            guard.release().await.expect("release");
        }
    }
}

/// A dropped guard releases in the background: the next waiter gets the key
/// without waiting for the TTL.
pub async fn dropped_guard_releases(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let waiter = harness.locker().await;
    let key = unique_key("dropped_guard_releases");
    let guard = holder.lock(&key).ttl(LONG_TTL).await.expect("acquire");
    drop(guard);
    let started = Instant::now();
    let next = waiter
        .lock(&key)
        .wait(Duration::from_secs(20))
        .await
        .expect("acquire after drop");
    let bound = harness.config().wake_bound;
    assert!(
        started.elapsed() < bound,
        "a dropped guard was not released promptly"
    );
    next.release().await.expect("release");
}

/// What the paused holder saw when it resumed.
#[derive(Debug)]
struct Resumed {
    token: FencingToken,
    still_held: bool,
    lost_signalled: bool,
    late_write: Result<(), crate::StaleToken>,
}

/// A holder whose whole process stalls past its TTL (a long GC pause, a
/// SIGSTOP, a VM migration): when it resumes, its guard reports the loss
/// (`is_held()` false, `lost()` resolved), another client holds the key
/// with a higher token, and the paused holder's late write is turned away
/// by the fence.
///
/// Each client runs on a thread of its own with its own runtime, and makes
/// its locker there, so the stall stops everything the holder's process
/// runs: its renewals, its connections, a shared lease keep-alive.
pub async fn paused_holder_is_fenced(harness: &dyn Harness) {
    let key = unique_key("paused_holder_is_fenced");
    let ttl = harness.config().short_ttl;
    let stall = ttl * 4;
    let resource = crate::FencedResource::new();
    let (key, resource) = (&key, &resource);
    let run = || {
        std::thread::scope(|scope| {
            let (acquired, acquired_seen) = std::sync::mpsc::channel::<()>();
            let (resumed, resumed_seen) = std::sync::mpsc::channel::<()>();
            let holder = scope.spawn(move || {
                client_runtime().block_on(async {
                    let locker = harness.locker().await;
                    let guard = locker.lock(key).ttl(ttl).await.expect("the holder acquires");
                    let token = guard.fencing_token();
                    resource.write(0, token).expect("the holder's first write");
                    let _ = acquired.send(());
                    // The whole process stalls: no renewal, no keep-alive.
                    std::thread::sleep(stall);
                    let still_held = guard.is_held();
                    let lost_signalled = timeout(ttl, guard.lost()).await.is_ok();
                    let late_write = resource.write(0, token);
                    let _ = resumed.send(());
                    Resumed {
                        token,
                        still_held,
                        lost_signalled,
                        late_write,
                    }
                })
            });
            let rival = scope.spawn(move || {
                client_runtime().block_on(async {
                    let locker = harness.locker().await;
                    acquired_seen.recv().expect("the holder acquired");
                    let guard = locker
                        .lock(key)
                        .ttl(LONG_TTL)
                        .wait(stall - ttl)
                        .await
                        .expect("the rival gets the key once the paused holder's lease ran out");
                    let token = guard.fencing_token();
                    resource.write(1, token).expect("the rival's write");
                    // Hold until the paused holder has looked around.
                    let _ = resumed_seen.recv();
                    let still_held = guard.is_held();
                    guard.release().await.expect("the rival releases");
                    (token, still_held)
                })
            });
            (holder.join(), rival.join())
        })
    };
    let (holder, rival) =
        if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            tokio::task::block_in_place(run)
        } else {
            run()
        };
    let resumed = holder.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let (rival_token, rival_held) = rival.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    assert!(
        !resumed.still_held,
        "a guard that stalled past its TTL must not claim the lock"
    );
    assert!(
        resumed.lost_signalled,
        "lost() must resolve once the stalled holder resumes"
    );
    assert!(
        rival_token > resumed.token,
        "the rival's token {rival_token} must exceed the paused holder's {}",
        resumed.token
    );
    assert!(
        rival_held,
        "the rival held the key while the paused holder looked around"
    );
    match resumed.late_write {
        Err(stale) => assert_eq!(stale.highest, rival_token),
        Ok(()) => panic!("the paused holder's late write must be turned away by the fence"),
    }
    let report = resource.check();
    assert_eq!((report.accepted, report.rejected_stale), (2, 1), "{report:?}");
}

/// A runtime of its own for one simulated client process.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime for a client thread")
}
