//! The backend crates re-export the same user API, so that a program using
//! both can glob-import both without a clash, and the backend-author API
//! stays in `dlock_core::backend`. This file compiling is most of the check.

#[allow(unused_imports)]
use dlock_etcd::*;
#[allow(unused_imports)]
use dlock_redis::*;

#[test]
fn both_globs_name_the_user_api_once() {
    // Each of these would be an ambiguity error if the two crates exported
    // different items of the same name.
    let _: fn(RedisBackend) -> Locker = Locker::new;
    let _: fn(EtcdBackend) -> Locker = Locker::new;
    let _: Option<LockGuard> = None;
    let _: Option<LockRequest> = None;
    let token = FencingToken::new(7);
    assert_eq!(token.get(), 7);
    let error = LockError::Contended { key: "k".into() };
    assert_eq!(error.key(), Some("k"));
    assert_eq!(KeyStatus::held().last_token(3).last_token, Some(3));
    assert_eq!((TTL_SHORT, TTL_MEDIUM, TTL_LONG, DEFAULT_TTL).3, TTL_MEDIUM);
    assert!(validate_key("orders/42").is_ok());
    // Backend defaults are associated constants: no two free items share a name.
    assert_ne!(RedisBackend::DEFAULT_KEY_PREFIX, EtcdBackend::DEFAULT_KEY_PREFIX);
    assert!(RedlockBackend::DEFAULT_NODE_TIMEOUT < RedisBackend::DEFAULT_COMMAND_TIMEOUT);
    // The drivers come along for those who need them.
    let _ = redis::cmd("PING");
    let _ = etcd_client::GetOptions::new();
}
