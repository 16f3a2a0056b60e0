//! One module per scenario, numbered as in the benchmark issue. Each `run`
//! adds its rows, summary lines and plot panels to the report.

pub(crate) mod election;
pub(crate) mod etcd;
pub(crate) mod handoff;
pub(crate) mod rwlock;
pub(crate) mod throughput;
pub(crate) mod uncontended;
pub(crate) mod watchdog;
