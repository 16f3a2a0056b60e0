//! Scenarios 1 and 4: the uncontended acquire + release cycle on one Redis,
//! and the same on Redlock's independent nodes; the peers on the same servers,
//! interleaved with the rest.

use dlock_redis::{Locker, RedisBackend, RedlockBackend};

use crate::contenders::{Contender, floor_connection, interleaved, peers, round_trip};
use crate::report::{Report, ratio};
use crate::{Budget, Result, Servers};

const UNCONTENDED: &str = "1. uncontended acquire + release, one Redis";
const REDLOCK: &str = "4. uncontended cycle, Redlock on 5 nodes (ratio to dlock on one node)";

/// Runs scenarios 1 and 4; returns one round trip on the single server.
pub(crate) async fn run(
    servers: &Servers,
    budget: Budget,
    report: &mut Report,
) -> Result<std::time::Duration> {
    let url = servers.redis()?;
    let redlock_urls = servers.redlock()?;
    let single_peers = peers(&[url.to_owned()]).await?;
    let redlock_peers = peers(redlock_urls).await?;
    let mut redlock_connections = Vec::new();
    for node in redlock_urls {
        redlock_connections.push(floor_connection(node).await?);
    }
    // Fixed places first, then the peers on one node, then on five.
    const FLOOR: usize = 0;
    const DLOCK: usize = 1;
    const DLOCK_REDLOCK: usize = 2;
    const FLOOR_REDLOCK: usize = 3;
    const PEERS: usize = 4;
    let mut contenders = vec![
        Contender::FloorRedis(floor_connection(url).await?),
        Contender::Dlock(Locker::new(RedisBackend::connect(url).await?)),
        Contender::Dlock(Locker::new(RedlockBackend::connect(redlock_urls).await?)),
        Contender::FloorRedlock(redlock_connections),
    ];
    contenders.extend(single_peers.iter().map(|(_, contender)| contender.clone()));
    contenders.extend(redlock_peers.iter().map(|(_, contender)| contender.clone()));
    let round_trip = round_trip(url).await?;
    let cycles = interleaved(&mut contenders, "uncontended", budget.cycles(), Budget::ROUNDS).await?;
    let redlock_peer_cycles = &cycles[PEERS + single_peers.len()..];

    let floor = cycles[FLOOR].median();
    report.row(UNCONTENDED, "floor (raw EVALSHA x2)", &cycles[FLOOR], floor);
    report.row(UNCONTENDED, "dlock RedisBackend", &cycles[DLOCK], floor);
    for ((name, _), samples) in single_peers.iter().zip(&cycles[PEERS..]) {
        report.row(UNCONTENDED, name, samples, floor);
    }
    let one_node = cycles[DLOCK].median();
    report.row(
        REDLOCK,
        "floor on 5 nodes (raw EVALSHA x2 to all; acquire at a majority, release at all)",
        &cycles[FLOOR_REDLOCK],
        one_node,
    );
    report.row(REDLOCK, "dlock RedlockBackend", &cycles[DLOCK_REDLOCK], one_node);
    for ((name, _), samples) in redlock_peers.iter().zip(redlock_peer_cycles) {
        report.row(REDLOCK, name, samples, one_node);
    }

    report.line(format!(
        "floor round trip (one acquire EVALSHA): median {round_trip:?}"
    ));
    report.line(format!(
        "Redlock on 5 nodes: dlock {:.2}x the raw 5-node floor, which is itself {:.2}x the one-node floor",
        ratio(cycles[DLOCK_REDLOCK].median(), cycles[FLOOR_REDLOCK].median()),
        ratio(cycles[FLOOR_REDLOCK].median(), floor),
    ));

    let mut one = vec![("floor", &cycles[FLOOR]), ("dlock", &cycles[DLOCK])];
    one.extend(
        single_peers
            .iter()
            .zip(&cycles[PEERS..])
            .map(|((name, _), samples)| (*name, samples)),
    );
    report.panel("1. uncontended cycle, one Redis", one);
    let mut five = vec![
        ("floor", &cycles[FLOOR_REDLOCK]),
        ("dlock", &cycles[DLOCK_REDLOCK]),
    ];
    five.extend(
        redlock_peers
            .iter()
            .zip(redlock_peer_cycles)
            .map(|((name, _), samples)| (*name, samples)),
    );
    report.panel("4. uncontended cycle, Redlock on 5 nodes", five);
    Ok(round_trip)
}
