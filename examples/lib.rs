//! Runnable examples for dlock; see `examples/*.rs` and run them with
//! `cargo run --example <name>`.
