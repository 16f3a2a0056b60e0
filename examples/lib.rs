//! Runnable examples for dlock; see `examples/*.rs` and run them with
//! `cargo run --example <name>`.

/// The README's examples, compiled as doctests so that they stay true. They
/// use every backend, so they run with both features on (`cargo xtask ci`
/// turns them on).
#[cfg(all(doctest, feature = "redis", feature = "etcd"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
