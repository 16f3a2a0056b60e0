//! Runnable examples for dlock; see `examples/*.rs` and run them with
//! `cargo run --example <name>`.

/// The README's examples, compiled as doctests so that they stay true (this
/// package depends on every backend, so all of them compile here).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
