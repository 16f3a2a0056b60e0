//! Scenario 6, the watchdog at scale: many auto-renewed guards held on one backend.

use std::time::{Duration, Instant};

use dlock_redis::{Locker, RedisBackend};

use crate::contenders::floor_connection;
use crate::report::Report;
use crate::stats::{cpu_seconds, resident_bytes, server_commands};
use crate::{Budget, Result, Servers};

pub(crate) async fn run(servers: &Servers, budget: Budget, report: &mut Report) -> Result {
    let (guards, hold) = if budget.quick {
        (1_000, Duration::from_secs(3))
    } else {
        (10_000, Duration::from_secs(30))
    };
    let scale = watchdog_at_scale(servers.redis()?, guards, hold).await?;
    report.line(format!(
        "watchdog at scale: {} guards (TTL 3 s, auto-renewed) held for {:.1?}: {} lost; client memory {:.0} bytes per guard \
         (resident set growth); client CPU {:.0}% of one core; Redis {:.0} commands/s",
        scale.guards,
        scale.held_for,
        scale.lost,
        scale.bytes_per_guard,
        scale.client_cpu * 100.0,
        scale.commands_per_second,
    ));
    Ok(())
}

/// What the watchdog-at-scale run saw.
struct Watchdogs {
    guards: usize,
    lost: usize,
    held_for: Duration,
    bytes_per_guard: f64,
    client_cpu: f64,
    commands_per_second: f64,
}

/// Holds `guards` auto-renewed locks (TTL 3 s, renewed every second) on one
/// backend for `hold`, then counts the guards that were lost, the client's
/// memory per guard (resident set growth), its CPU share, and the server's
/// commands per second.
async fn watchdog_at_scale(url: &str, guards: usize, hold: Duration) -> Result<Watchdogs> {
    let backend = RedisBackend::connect(url).await?;
    let locker = Locker::new(backend);
    let mut admin = floor_connection(url).await?;
    let resident_before = resident_bytes();
    let mut held = Vec::with_capacity(guards);
    let run = std::process::id();
    for index in 0..guards {
        held.push(
            locker
                .lock(format!("scale/{run}/{index}"))
                .ttl(Duration::from_secs(3))
                .try_lock()
                .await?,
        );
    }
    let resident_after = resident_bytes();
    let commands_before = server_commands(&mut admin).await?;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    tokio::time::sleep(hold).await;
    let held_for = started.elapsed();
    let cpu = cpu_seconds() - cpu_before;
    let commands = server_commands(&mut admin).await? - commands_before;
    let lost = held.iter().filter(|guard| !guard.is_held()).count();
    for guard in held {
        guard.release().await?;
    }
    Ok(Watchdogs {
        guards,
        lost,
        held_for,
        bytes_per_guard: resident_after.saturating_sub(resident_before) as f64 / guards as f64,
        client_cpu: cpu / held_for.as_secs_f64(),
        commands_per_second: commands as f64 / held_for.as_secs_f64(),
    })
}
