//! Scenario 7, leader election: how fast leadership moves and how fast
//! observers learn of it, on one Redis and on etcd, against dlock's own
//! mutex hand-off and (on etcd) etcd's own election service in the same run.
//!
//! - resign -> next leader: a candidate waits while another leads; the gap
//!   is from the leader's `resign` returning to the waiter's campaign
//!   returning. The mutex row is the same dance with `lock` and `release`.
//! - killed leader -> next leader: the leader stops renewing (as if its
//!   process died) right after it was elected; the gap is from then to the
//!   next candidate leading, against the dead leader's TTL.
//! - observer delay: the leader proclaims a new value; the delay is from
//!   the `proclaim` call to an observer on another connection yielding it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dlock_redis::{Leadership, LockGuard, Locker};
use etcd_client::{LeaderKey, ProclaimOptions, ResignOptions};
use futures_util::StreamExt;

use crate::report::{Report, ratio};
use crate::stats::Samples;
use crate::{Budget, Result, Servers};

const SCENARIO: &str = "7. leader election";
/// How long a campaign may wait for the lead before the run gives up.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long the next candidate is given to start waiting before the
/// leader steps down, so that every sample measures a real hand-off.
const PARK: Duration = Duration::from_millis(10);
/// The TTL of the etcd leases the service candidates campaign with: longer
/// than the whole scenario, since nothing keeps them alive (revoked at the end).
const SERVICE_LEASE_SECS: i64 = 600;

/// How many samples each measurement takes.
struct Counts {
    handoffs: usize,
    proclaims: usize,
    kills: usize,
}

impl Counts {
    fn of(budget: Budget) -> Counts {
        if budget.quick {
            Counts {
                handoffs: 30,
                proclaims: 30,
                kills: 2,
            }
        } else {
            Counts {
                handoffs: 300,
                proclaims: 300,
                kills: 6,
            }
        }
    }
}

pub(crate) async fn run(servers: &Servers, budget: Budget, report: &mut Report) -> Result {
    let counts = Counts::of(budget);
    let url = servers.redis()?;
    let redis_round_trip = crate::contenders::round_trip(url).await?;
    let redis = || async {
        Ok::<_, dlock_redis::LockError>(Locker::new(dlock_redis::RedisBackend::connect(url).await?))
    };
    let on_redis = measure_dlock(
        Backend {
            name: "Redis",
            round_trip: redis_round_trip,
            ttl: Duration::from_millis(500),
        },
        [redis().await?, redis().await?],
        &counts,
    )
    .await?;

    let endpoints = servers.etcd()?;
    let client = etcd_client::Client::connect(endpoints, None).await?;
    let etcd_round_trip = etcd_round_trip(&client).await?;
    let etcd = || async {
        Ok::<_, dlock_redis::LockError>(Locker::new(dlock_etcd::EtcdBackend::connect(endpoints).await?))
    };
    let on_etcd = Backend {
        name: "etcd",
        round_trip: etcd_round_trip,
        // etcd leases are whole seconds, and the server raises short ones.
        ttl: Duration::from_secs(2),
    };
    let service = measure_service(on_etcd, endpoints, &counts).await?;
    let on_etcd = measure_dlock(on_etcd, [etcd().await?, etcd().await?], &counts).await?;
    report.line(format!(
        "leader election ({} hand-offs, {} proclamations, {} kills each; one round trip: Redis {redis_round_trip:?}, etcd {etcd_round_trip:?} \
         for a linearizable read):",
        counts.handoffs, counts.proclaims, counts.kills
    ));
    for run in [&on_redis, &on_etcd, &service] {
        run.report(report);
    }
    report.panel(
        "7. resign -> next leader",
        [&on_redis, &on_etcd, &service]
            .into_iter()
            .flat_map(|run| run.handoff_series())
            .collect(),
    );
    Ok(())
}

/// The server a contender runs on, and the bases of its ratios.
#[derive(Clone, Copy)]
struct Backend {
    name: &'static str,
    round_trip: Duration,
    /// The TTL of the leaders killed.
    ttl: Duration,
}

/// One contender's figures.
struct Figures {
    who: &'static str,
    on: Backend,
    /// dlock's mutex hand-off on the same backend, beside the election's.
    mutex_handoffs: Option<(&'static str, Samples)>,
    handoffs: Samples,
    kills: Samples,
    observed: Samples,
}

impl Figures {
    /// The table rows and a summary line.
    fn report(&self, report: &mut Report) {
        let Backend {
            name,
            round_trip,
            ttl,
        } = self.on;
        let scenario = format!("{SCENARIO} on {name}: resign -> next leader (ratio to one round trip)");
        if let Some((who, mutex)) = &self.mutex_handoffs {
            report.row(
                &scenario,
                &format!("{who} (release -> next holder)"),
                mutex,
                round_trip,
            );
        }
        report.row(&scenario, self.who, &self.handoffs, round_trip);
        report.row(
            &format!("{SCENARIO} on {name}: proclaim called -> observer yields it (ratio to one round trip)"),
            self.who,
            &self.observed,
            round_trip,
        );
        report.row(
            &format!("{SCENARIO} on {name}: leader killed -> next leader (ratio to its TTL of {ttl:?})"),
            self.who,
            &self.kills,
            ttl,
        );
        let mutex = self.mutex_handoffs.as_ref().map_or(String::new(), |(_, mutex)| {
            format!(" (the mutex's: {:.2})", ratio(mutex.median(), round_trip))
        });
        report.line(format!(
            "  {}: resign -> next leader, median {:.2} round trips{mutex}; observer delay after proclaim, median {:.2} round trips \
             (p99 {:.2}); killed leader replaced after median {:?} (TTL {ttl:?}, so {:?} past it)",
            self.who,
            ratio(self.handoffs.median(), round_trip),
            ratio(self.observed.median(), round_trip),
            ratio(self.observed.p99(), round_trip),
            self.kills.median(),
            self.kills.median().saturating_sub(ttl),
        ));
    }

    fn handoff_series(&self) -> Vec<(&'static str, &Samples)> {
        let mut series = Vec::new();
        if let Some((who, mutex)) = &self.mutex_handoffs {
            series.push((*who, mutex));
        }
        series.push((self.who, &self.handoffs));
        series
    }
}

/// dlock's election and mutex on one backend, through two lockers (two
/// clients, as two processes would have).
async fn measure_dlock(on: Backend, lockers: [Locker; 2], counts: &Counts) -> Result<Figures> {
    let key = format!("bench-election-{}-{}", on.name, std::process::id());
    let [first, second] = lockers.map(Arc::new);
    let mutex_handoffs = handoffs(
        Candidate::Mutex(Arc::clone(&first)),
        Candidate::Mutex(Arc::clone(&second)),
        &format!("{key}-mutex"),
        counts.handoffs,
    )
    .await?;
    let handoffs = handoffs(
        Candidate::Election(Arc::clone(&first)),
        Candidate::Election(Arc::clone(&second)),
        &key,
        counts.handoffs,
    )
    .await?;
    let observed = dlock_observer_delays(&first, &second, &key, counts.proclaims).await?;
    let mut kills = Samples::default();
    for _ in 0..counts.kills {
        let dead = first
            .election(&key)
            .campaign("dead")
            .ttl(on.ttl)
            .auto_renew(false)
            .wait(PATIENCE)
            .await?;
        let killed = Instant::now();
        dead.forget();
        let next = second.election(&key).campaign("next").wait(PATIENCE).await?;
        kills.push(killed.elapsed());
        next.resign().await?;
    }
    let (election, mutex) = if on.name == "Redis" {
        ("dlock election on Redis", "dlock mutex on Redis")
    } else {
        ("dlock election on etcd", "dlock mutex on etcd")
    };
    Ok(Figures {
        who: election,
        on,
        mutex_handoffs: Some((mutex, mutex_handoffs)),
        handoffs,
        kills,
        observed,
    })
}

/// From each `proclaim` call to `second`'s observer yielding the value.
async fn dlock_observer_delays(first: &Locker, second: &Locker, key: &str, count: usize) -> Result<Samples> {
    let leadership = first.election(key).campaign("v0").wait(PATIENCE).await?;
    let mut observation = second.election(key).observe();
    wait_for_dlock_value(&mut observation, "v0").await?;
    let mut delays = Samples::default();
    for sample in 1..=count {
        let value = format!("v{sample}");
        let called = Instant::now();
        leadership.proclaim(value.as_str()).await?;
        wait_for_dlock_value(&mut observation, &value).await?;
        delays.push(called.elapsed());
    }
    leadership.resign().await?;
    Ok(delays)
}

async fn wait_for_dlock_value(observation: &mut dlock_redis::Observation, value: &str) -> Result {
    let wait = async {
        while let Some(state) = observation.next().await {
            if state?.is_some_and(|leader| leader.value == value) {
                return Ok(());
            }
        }
        Err::<(), Box<dyn std::error::Error + Send + Sync>>("the observation ended".into())
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .map_err(|_| format!("no observer saw {value} within {PATIENCE:?}"))?
}

/// etcd's own election service (etcd-client's election API), each
/// candidate on its own lease, as etcd's `concurrency.Election` does.
async fn measure_service(on: Backend, endpoints: &[String], counts: &Counts) -> Result<Figures> {
    let name = format!("bench-etcd-service-election-{}", std::process::id());
    let mut leases = Vec::new();
    let mut candidates = Vec::new();
    for _ in 0..2 {
        let client = etcd_client::Client::connect(endpoints, None).await?;
        let lease = client.lease_client().grant(SERVICE_LEASE_SECS, None).await?.id();
        leases.push((client.clone(), lease));
        candidates.push(Candidate::Service {
            client: Box::new(client),
            lease,
        });
    }
    let [first, second]: [Candidate; 2] = candidates.try_into().map_err(|_| "two service candidates")?;
    let handoffs = handoffs(first.clone(), second.clone(), &name, counts.handoffs).await?;
    let observed = service_observer_delays(&first, &second, &name, counts.proclaims).await?;
    let mut kills = Samples::default();
    for _ in 0..counts.kills {
        let Candidate::Service { client, .. } = &first else {
            return Err("a service candidate".into());
        };
        let seconds = i64::try_from(on.ttl.as_secs()).unwrap_or(i64::MAX);
        let short = client.lease_client().grant(seconds, None).await?.id();
        let dead = Candidate::Service {
            client: client.clone(),
            lease: short,
        };
        dead.lead(&name).await?;
        // Never kept alive: the lease runs out as a dead process's would.
        let killed = Instant::now();
        let next = second.lead(&name).await?;
        kills.push(killed.elapsed());
        second.step_down(next).await?;
    }
    for (client, lease) in leases {
        client.lease_client().revoke(lease).await?;
    }
    Ok(Figures {
        who: "etcd election service (etcd-client)",
        on,
        mutex_handoffs: None,
        handoffs,
        kills,
        observed,
    })
}

async fn service_observer_delays(
    first: &Candidate,
    second: &Candidate,
    name: &str,
    count: usize,
) -> Result<Samples> {
    let (
        Candidate::Service {
            client: leader_client,
            ..
        },
        Candidate::Service {
            client: observer_client,
            ..
        },
    ) = (first, second)
    else {
        return Err("service candidates".into());
    };
    let leading = first.lead(name).await?;
    let Leading::Service(leader_key) = &leading else {
        return Err("a service leadership".into());
    };
    let mut observation = observer_client.election_client().observe(name).await?;
    wait_for_service_value(&mut observation, "v0").await?;
    let mut delays = Samples::default();
    for sample in 1..=count {
        let value = format!("v{sample}");
        let called = Instant::now();
        leader_client
            .election_client()
            .proclaim(
                value.as_str(),
                Some(ProclaimOptions::new().with_leader(leader_key.clone())),
            )
            .await?;
        wait_for_service_value(&mut observation, &value).await?;
        delays.push(called.elapsed());
    }
    first.step_down(leading).await?;
    Ok(delays)
}

async fn wait_for_service_value(observation: &mut etcd_client::ObserveStream, value: &str) -> Result {
    let wait = async {
        while let Some(response) = observation.message().await? {
            if response.kv().is_some_and(|kv| kv.value() == value.as_bytes()) {
                return Ok(());
            }
        }
        Err::<(), Box<dyn std::error::Error + Send + Sync>>("the observation ended".into())
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .map_err(|_| format!("no observer saw {value} within {PATIENCE:?}"))?
}

/// One side of a hand-off.
#[derive(Clone)]
enum Candidate {
    Mutex(Arc<Locker>),
    Election(Arc<Locker>),
    /// etcd's election service, campaigning on `lease`.
    Service {
        client: Box<etcd_client::Client>,
        lease: i64,
    },
}

enum Leading {
    Mutex(LockGuard),
    Election(Leadership),
    Service(LeaderKey),
}

impl Candidate {
    /// Waits until this candidate holds `key`. The campaign's first value
    /// is "v0" (what the observer measurements wait for first).
    async fn lead(&self, key: &str) -> Result<Leading> {
        Ok(match self {
            Candidate::Mutex(locker) => Leading::Mutex(locker.lock(key).wait(PATIENCE).await?),
            Candidate::Election(locker) => {
                Leading::Election(locker.election(key).campaign("v0").wait(PATIENCE).await?)
            }
            Candidate::Service { client, lease } => {
                let mut elected = client.election_client().campaign(key, "v0", *lease).await?;
                Leading::Service(
                    elected
                        .take_leader()
                        .ok_or("a campaign answer without its leader key")?,
                )
            }
        })
    }

    async fn step_down(&self, leading: Leading) -> Result {
        match (self, leading) {
            (_, Leading::Mutex(guard)) => guard.release().await?,
            (_, Leading::Election(leadership)) => leadership.resign().await?,
            (Candidate::Service { client, .. }, Leading::Service(key)) => {
                client
                    .election_client()
                    .resign(Some(ResignOptions::new().with_leader(key)))
                    .await?;
            }
            _ => return Err("a service leadership without its client".into()),
        }
        Ok(())
    }
}

/// `count` hand-offs between two candidates taking turns: the waiter
/// starts waiting, the leader steps down, and the gap is from the step
/// down returning to the waiter leading.
async fn handoffs(first: Candidate, second: Candidate, key: &str, count: usize) -> Result<Samples> {
    let (mut leader, mut waiter) = (Arc::new(first), Arc::new(second));
    let mut leading = leader.lead(key).await?;
    let mut gaps = Samples::default();
    for _ in 0..count {
        let next = {
            let (waiter, key) = (Arc::clone(&waiter), key.to_owned());
            tokio::spawn(async move {
                let led = waiter.lead(&key).await;
                (led, Instant::now())
            })
        };
        tokio::time::sleep(PARK).await;
        leader.step_down(leading).await?;
        let stepped_down = Instant::now();
        let (led, led_at) = next.await.map_err(|error| format!("candidate task: {error}"))?;
        leading = led?;
        gaps.push(led_at.saturating_duration_since(stepped_down));
        std::mem::swap(&mut leader, &mut waiter);
    }
    leader.step_down(leading).await.map(|()| gaps)
}

/// One etcd round trip: the median of 200 linearizable reads.
async fn etcd_round_trip(client: &etcd_client::Client) -> Result<Duration> {
    let mut kv = client.kv_client();
    let mut reads = Samples::default();
    for _ in 0..200 {
        let started = Instant::now();
        kv.get("bench-round-trip", None).await?;
        reads.push(started.elapsed());
    }
    Ok(reads.median())
}
