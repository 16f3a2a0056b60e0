//! Scenario 2, throughput: 64 tasks on 64 keys over one shared client each,
//! interleaved in short slices; the client's and the server's CPU time per
//! cycle show where the time goes.

use std::time::{Duration, Instant};

use dlock_redis::{Locker, RedisBackend};
use redis::aio::MultiplexedConnection;

use crate::contenders::{Contender, floor_connection, peers};
use crate::report::Report;
use crate::stats::{cpu_seconds, server_cpu};
use crate::{Budget, Result, Servers, Solo};

const TASKS: usize = 64;

pub(crate) async fn run(servers: &Servers, budget: Budget, report: &mut Report) -> Result {
    let url = servers.redis()?;
    let (slices, slice) = if budget.quick {
        (2, Duration::from_millis(500))
    } else {
        (8, Duration::from_secs(1))
    };
    let mut admin = floor_connection(url).await?;
    let mut contenders = floors_and_dlock(url).await?;
    contenders.extend(peers(&[url.to_owned()]).await?);
    let rows = interleaved_loads(&contenders, slices, slice, &mut admin).await?;
    let dlock_rate = rows
        .iter()
        .find(|(name, _)| *name == "dlock")
        .map_or(0.0, |(_, load)| load.rate);
    report.line(format!(
        "throughput, {TASKS} tasks on {TASKS} keys, one shared client each, median of {slices} slices of {slice:?}:"
    ));
    for (name, load) in &rows {
        report.line(format!(
            "  {name}: {:.0} cycles/s (dlock {:.2}x); CPU per cycle: client {:.1} us, Redis {:.1} us",
            load.rate,
            dlock_rate / load.rate.max(1.0),
            load.client_micros,
            load.server_micros,
        ));
    }
    Ok(())
}

/// The floor, the unfenced floor and dlock, each on a client of its own.
async fn floors_and_dlock(url: &str) -> Result<Vec<(&'static str, Contender)>> {
    Ok(vec![
        ("floor", Contender::FloorRedis(floor_connection(url).await?)),
        (
            "unfenced floor",
            Contender::UnfencedFloor(floor_connection(url).await?),
        ),
        (
            "dlock",
            Contender::Dlock(Locker::new(RedisBackend::connect(url).await?)),
        ),
    ])
}

/// One contender alone for `duration`.
pub(crate) async fn profile(url: &str, solo: Solo, duration: Duration) -> Result {
    let (name, contender) = match solo {
        Solo::Dlock => (
            "dlock",
            Contender::Dlock(Locker::new(RedisBackend::connect(url).await?)),
        ),
        Solo::Floor => ("floor", Contender::FloorRedis(floor_connection(url).await?)),
        Solo::Rslock => (
            "rslock",
            Contender::Rslock(rslock::LockManager::new(vec![url.to_owned()])),
        ),
    };
    let rate = throughput(|| contender.clone(), TASKS, duration).await?;
    println!("{name} throughput, {TASKS} tasks on {TASKS} keys: {rate:.0} cycles/s");
    Ok(())
}

/// The two floors, dlock and rslock, 8 slices of 1 s each.
pub(crate) async fn profile_versus(url: &str) -> Result {
    let mut admin = floor_connection(url).await?;
    let mut contenders = floors_and_dlock(url).await?;
    contenders.push((
        "rslock",
        Contender::Rslock(rslock::LockManager::new(vec![url.to_owned()])),
    ));
    for (name, load) in interleaved_loads(&contenders, 8, Duration::from_secs(1), &mut admin).await? {
        println!(
            "{name}: {:.0} cycles/s; CPU per cycle: client {:.1} us, Redis {:.1} us",
            load.rate, load.client_micros, load.server_micros
        );
    }
    Ok(())
}

/// One throughput slice: cycles per second, and CPU time per cycle in this
/// process and in the Redis server.
#[derive(Clone, Copy)]
struct Load {
    rate: f64,
    client_micros: f64,
    server_micros: f64,
}

impl Load {
    /// The median of each figure on its own.
    fn median(loads: &[Load]) -> Load {
        let median = |pick: fn(&Load) -> f64| {
            let mut values: Vec<f64> = loads.iter().map(pick).collect();
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or(0.0)
        };
        Load {
            rate: median(|load| load.rate),
            client_micros: median(|load| load.client_micros),
            server_micros: median(|load| load.server_micros),
        }
    }
}

/// Each contender's median [`Load`] over `slices` slices of `slice`, taken in
/// turn so that drift in the machine's load hits all alike.
async fn interleaved_loads<'a>(
    contenders: &[(&'a str, Contender)],
    slices: usize,
    slice: Duration,
    admin: &mut MultiplexedConnection,
) -> Result<Vec<(&'a str, Load)>> {
    let mut loads: Vec<Vec<Load>> = contenders.iter().map(|_| Vec::new()).collect();
    for _ in 0..slices {
        for ((_, contender), loads) in contenders.iter().zip(&mut loads) {
            loads.push(measured_throughput(contender, slice, admin).await?);
        }
    }
    Ok(contenders
        .iter()
        .zip(&loads)
        .map(|((name, _), loads)| (*name, Load::median(loads)))
        .collect())
}

/// 64 tasks on 64 keys through one shared `contender` for `slice`.
async fn measured_throughput(
    contender: &Contender,
    slice: Duration,
    admin: &mut MultiplexedConnection,
) -> Result<Load> {
    let client_before = cpu_seconds();
    let server_before = server_cpu(admin).await?;
    let rate = throughput(|| contender.clone(), TASKS, slice).await?;
    let cycles = (rate * slice.as_secs_f64()).max(1.0);
    Ok(Load {
        rate,
        client_micros: (cpu_seconds() - client_before) / cycles * 1e6,
        server_micros: (server_cpu(admin).await? - server_before) / cycles * 1e6,
    })
}

/// Cycles per second of `tasks` tasks, each on its own key, for `duration`;
/// every task uses one shared contender (one connection, one backend).
async fn throughput(make: impl Fn() -> Contender, tasks: usize, duration: Duration) -> Result<f64> {
    let stop_at = Instant::now() + duration;
    let mut running = Vec::new();
    for task in 0..tasks {
        let mut contender = make();
        running.push(tokio::spawn(async move {
            let key = format!("throughput/{task}");
            let mut cycles = 0u64;
            while Instant::now() < stop_at {
                contender.cycle(&key).await.map_err(|error| error.to_string())?;
                cycles += 1;
            }
            Ok::<_, String>(cycles)
        }));
    }
    let mut total = 0u64;
    for task in running {
        total += task.await.map_err(|error| error.to_string())??;
    }
    Ok(total as f64 / duration.as_secs_f64())
}
