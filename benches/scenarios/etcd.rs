//! Scenario 5, etcd lock + unlock with a warm session: dlock against the
//! raw transaction and etcd's own lock service.

use std::fmt::Write as _;

use dlock_redis::Locker;

use crate::contenders::{Contender, interleaved, timed_cycles, warm_lease};
use crate::report::Report;
use crate::{Budget, Result, Servers};

const SCENARIO: &str = "5. etcd lock + unlock, warm session";

pub(crate) async fn run(servers: &Servers, budget: Budget, report: &mut Report) -> Result {
    let endpoints = servers.etcd()?;
    let client = etcd_client::Client::connect(endpoints, None).await?;
    let lease = warm_lease(&client).await?;
    let mut contenders = vec![
        Contender::FloorEtcd {
            client: client.clone(),
            lease,
        },
        Contender::Dlock(Locker::new(dlock_etcd::EtcdBackend::connect(endpoints).await?)),
        Contender::EtcdLockService { client, lease },
    ];
    // An etcd cycle waits for a disk sync: a tenth of Redis's count.
    let cycles = interleaved(
        &mut contenders,
        "uncontended",
        budget.cycles() / 10,
        Budget::ROUNDS,
    )
    .await?;
    let floor = cycles[0].median();
    report.row(SCENARIO, "floor (raw txn + delete)", &cycles[0], floor);
    report.row(SCENARIO, "dlock EtcdBackend", &cycles[1], floor);
    report.row(SCENARIO, "etcd lock service (lock/unlock)", &cycles[2], floor);
    Ok(())
}

/// The floor's and dlock's cycle in 8 batches of 1 000 on one key.
pub(crate) async fn profile_growth(endpoints: &[String]) -> Result {
    let client = etcd_client::Client::connect(endpoints, None).await?;
    let lease = warm_lease(&client).await?;
    let mut contenders = [
        ("floor", Contender::FloorEtcd { client, lease }),
        (
            "dlock",
            Contender::Dlock(Locker::new(dlock_etcd::EtcdBackend::connect(endpoints).await?)),
        ),
    ];
    for batch in 1..=8 {
        let mut line = format!("batch {batch} (1 000 cycles each):");
        for (name, contender) in &mut contenders {
            let samples = timed_cycles(contender, "growth", 1_000).await?;
            let _ = write!(line, " {name} median {:?};", samples.median());
        }
        println!("{line}");
    }
    Ok(())
}
