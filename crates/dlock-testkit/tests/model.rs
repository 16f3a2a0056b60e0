//! Model-based test: random operations from several clients against
//! `MemoryBackend` through the real `Locker`/`LockGuard`, compared step by
//! step with a small reference model of leases, owners and fencing counters.

use std::collections::HashMap;
use std::time::Duration;

use dlock_core::{FencingToken, LockError, LockGuard, Locker, NotHeldReason, drift_allowance};
use dlock_testkit::MemoryBackend;
use proptest::prelude::*;

const CLIENTS: usize = 3;
const KEYS: usize = 2;
const TTL_MS: u64 = 1_000;

#[derive(Debug, Clone)]
enum Op {
    TryLock { client: usize, key: usize },
    Release { client: usize, key: usize },
    Extend { client: usize, key: usize },
    Advance { ms: u64 },
    ForceExpire { key: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..CLIENTS, 0..KEYS).prop_map(|(client, key)| Op::TryLock { client, key }),
        2 => (0..CLIENTS, 0..KEYS).prop_map(|(client, key)| Op::Release { client, key }),
        2 => (0..CLIENTS, 0..KEYS).prop_map(|(client, key)| Op::Extend { client, key }),
        // Steps of 100 ms never land between a guard's local deadline
        // (ttl - drift = 988 ms) and the server's expiry (1 000 ms).
        3 => (1u64..=15).prop_map(|steps| Op::Advance { ms: steps * 100 }),
        1 => (0..KEYS).prop_map(|key| Op::ForceExpire { key }),
    ]
}

/// The reference model, in milliseconds since the start.
#[derive(Default)]
struct Model {
    now: u64,
    counters: [u64; KEYS],
    /// Per key: the holding acquisition and when its lease ends.
    holders: [Option<(u64, u64)>; KEYS],
    /// Per (client, key): the acquisition id, its token, its local deadline,
    /// and whether the guard knows it is lost.
    guards: HashMap<(usize, usize), ModelGuard>,
    next_acquisition: u64,
}

#[derive(Clone, Copy)]
struct ModelGuard {
    acquisition: u64,
    token: u64,
    valid_until: u64,
    lost: bool,
}

impl Model {
    fn live_holder(&self, key: usize) -> Option<u64> {
        self.holders[key]
            .filter(|&(_, expires)| self.now < expires)
            .map(|(id, _)| id)
    }

    fn guard_held(&self, guard: &ModelGuard) -> bool {
        !guard.lost && self.now < guard.valid_until
    }
}

fn key_name(key: usize) -> String {
    format!("model/{key}")
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let backend = MemoryBackend::new();
        let lockers: Vec<Locker> = (0..CLIENTS).map(|_| Locker::new(backend.clone())).collect();
        let ttl = Duration::from_millis(TTL_MS);
        let local_validity = TTL_MS - u64::try_from(drift_allowance(ttl).as_millis()).expect("small");
        let mut guards: HashMap<(usize, usize), LockGuard> = HashMap::new();
        let mut model = Model::default();

        for op in ops {
            match op {
                Op::TryLock { client, key } => {
                    let outcome = lockers[client]
                        .lock(key_name(key))
                        .ttl(ttl)
                        .auto_renew(false)
                        .try_lock()
                        .await;
                    match model.live_holder(key) {
                        Some(_) => {
                            prop_assert!(matches!(outcome, Err(LockError::Contended { .. })), "{outcome:?}");
                        }
                        None => {
                            let guard = outcome.map_err(|e| TestCaseError::fail(format!("try_lock: {e}")))?;
                            model.counters[key] += 1;
                            let token = model.counters[key];
                            prop_assert_eq!(guard.fencing_token(), FencingToken::new(token));
                            let acquisition = model.next_acquisition;
                            model.next_acquisition += 1;
                            model.holders[key] = Some((acquisition, model.now + TTL_MS));
                            model.guards.insert(
                                (client, key),
                                ModelGuard {
                                    acquisition,
                                    token,
                                    valid_until: model.now + local_validity,
                                    lost: false,
                                },
                            );
                            // Replacing an old guard must not release anything.
                            if let Some(old) = guards.insert((client, key), guard) {
                                old.forget();
                            }
                        }
                    }
                }
                Op::Release { client, key } => {
                    let Some(guard) = guards.remove(&(client, key)) else {
                        continue;
                    };
                    let expected = model.guards.remove(&(client, key)).expect("model guard");
                    let outcome = guard.release().await;
                    match model.live_holder(key) {
                        Some(id) if id == expected.acquisition => {
                            prop_assert!(outcome.is_ok(), "{outcome:?}");
                            model.holders[key] = None;
                        }
                        Some(_) => prop_assert!(
                            matches!(
                                outcome,
                                Err(LockError::NotHeld {
                                    reason: NotHeldReason::OtherOwner,
                                    ..
                                })
                            ),
                            "{outcome:?}"
                        ),
                        None => prop_assert!(
                            matches!(
                                outcome,
                                Err(LockError::NotHeld {
                                    reason: NotHeldReason::Expired,
                                    ..
                                })
                            ),
                            "{outcome:?}"
                        ),
                    }
                }
                Op::Extend { client, key } => {
                    let Some(guard) = guards.get(&(client, key)) else {
                        continue;
                    };
                    let expected = *model.guards.get(&(client, key)).expect("model guard");
                    let outcome = guard.extend(ttl).await;
                    let still_valid = model.guard_held(&expected);
                    let ours = model.live_holder(key) == Some(expected.acquisition);
                    let entry = model.guards.get_mut(&(client, key)).expect("model guard");
                    if !still_valid {
                        prop_assert!(matches!(outcome, Err(LockError::Lost { .. })), "{outcome:?}");
                        entry.lost = true;
                    } else if ours {
                        prop_assert!(outcome.is_ok(), "{outcome:?}");
                        entry.valid_until = model.now + local_validity;
                        model.holders[key] = Some((expected.acquisition, model.now + TTL_MS));
                    } else {
                        prop_assert!(matches!(outcome, Err(LockError::NotHeld { .. })), "{outcome:?}");
                        entry.lost = true;
                    }
                }
                Op::Advance { ms } => {
                    tokio::time::advance(Duration::from_millis(ms)).await;
                    // Let the watchdogs see their deadlines.
                    for _ in 0..5 {
                        tokio::task::yield_now().await;
                    }
                    model.now += ms;
                }
                Op::ForceExpire { key } => {
                    let was_live = model.live_holder(key).is_some();
                    prop_assert_eq!(backend.force_expire(&key_name(key)), was_live);
                    model.holders[key] = None;
                }
            }

            // After every step the real state matches the model.
            for key in 0..KEYS {
                let expected = model.live_holder(key).map(|id| {
                    let guard = model.guards.values().find(|guard| guard.acquisition == id);
                    guard.map(|guard| guard.token)
                });
                let actual = backend.holder_token(&key_name(key)).map(FencingToken::get);
                if let Some(Some(token)) = expected {
                    prop_assert_eq!(actual, Some(token), "holder of key {}", key);
                } else if expected.is_none() {
                    prop_assert_eq!(actual, None, "key {} must be free", key);
                }
            }
            for (slot, guard) in &guards {
                let expected = model.guards.get(slot).expect("model guard");
                prop_assert_eq!(
                    guard.is_held(),
                    model.guard_held(expected),
                    "guard {:?} at {} ms",
                    slot,
                    model.now
                );
            }
        }
        for (_, guard) in guards {
            guard.forget();
        }
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn memory_backend_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
