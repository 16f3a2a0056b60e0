//! redis-server deployments: one server, a Cluster, a Sentinel group; and a
//! tiny RESP client to set them up and watch them become ready.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::Pauses;
use crate::{Result, ServerProcess, require_program};

/// The name under which the Sentinel group monitors its master.
pub const SENTINEL_MASTER_NAME: &str = "dlock-master";

/// How long a deployment may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// Starts one redis-server (no persistence) with `extra` arguments and
/// waits until it answers PING.
pub fn start_server(name: &str, extra: &[String]) -> Result<ServerProcess> {
    let program = require_program("redis-server")?;
    let mut server = ServerProcess::start(name, &program, |dir, port| {
        let mut arguments = base_arguments(dir, port);
        arguments.extend_from_slice(extra);
        Ok(arguments)
    })?;
    wait_ping(&mut server)?;
    Ok(server)
}

/// Starts `count` independent redis-servers (Redlock nodes).
pub fn start_independent(count: usize) -> Result<Vec<ServerProcess>> {
    (0..count)
        .map(|index| start_server(&format!("redis-redlock-{index}"), &[]))
        .collect()
}

/// Waits until `server` answers PING (after a start or restart).
pub fn wait_ping(server: &mut ServerProcess) -> Result {
    server.wait_ready(
        READY_WITHIN,
        |port| matches!(command(port, &["PING"]), Ok(Reply::Status(status)) if status == "PONG"),
    )
}

fn base_arguments(dir: &Path, port: u16) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--dir",
        &dir.display().to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "yes",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The `redis://` URL of a server on a loopback port.
pub fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// A Redis Cluster of masters with one replica each.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<ServerProcess>,
}

impl RedisCluster {
    /// Starts `masters` masters and as many replicas, joins them with
    /// `redis-cli --cluster create`, and waits until every node reports the
    /// cluster ok and every replica is in sync. Node timeout 1 s, so that a
    /// killed master is replaced within a few seconds.
    pub fn start(masters: usize) -> Result<RedisCluster> {
        let cli = require_program("redis-cli")?;
        let extra: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            "--cluster-replica-validity-factor",
            "0",
        ]
        .map(str::to_owned)
        .to_vec();
        let nodes = (0..masters * 2)
            .map(|index| start_server(&format!("redis-cluster-{index}"), &extra))
            .collect::<Result<Vec<_>>>()?;
        let mut create = Command::new(cli);
        create.args(["--cluster", "create"]);
        create.args(nodes.iter().map(|node| format!("127.0.0.1:{}", node.port())));
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let output = create
            .output()
            .map_err(|error| format!("could not run redis-cli --cluster create: {error}"))?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed with {}:\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    /// Waits until every live node says `cluster_state:ok` and every live
    /// replica's link to its master is up.
    pub fn wait_healthy(&self) -> Result {
        let ports: Vec<u16> = self.nodes.iter().map(ServerProcess::port).collect();
        wait_until("the Redis Cluster to be healthy", || {
            ports.iter().all(|&port| {
                let info = command(port, &["CLUSTER", "INFO"])
                    .map(Reply::text)
                    .unwrap_or_default();
                let replication = command(port, &["INFO", "replication"])
                    .map(Reply::text)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && (replication.contains("role:master") || replication.contains("master_link_status:up"))
            })
        })
    }

    /// Seed URLs: every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|node| url(node.port())).collect()
    }

    /// The index of the node that is now the master for `key`'s slot.
    pub fn master_for(&self, key: &str) -> Result<usize> {
        let any = self.live_port()?;
        let slot = match command(any, &["CLUSTER", "KEYSLOT", key])? {
            Reply::Integer(slot) => slot,
            other => return Err(format!("CLUSTER KEYSLOT answered {other:?}")),
        };
        let nodes = command(any, &["CLUSTER", "NODES"])?.text();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                matches!((low.parse::<i64>(), high.parse::<i64>()), (Ok(low), Ok(high)) if (low..=high).contains(&slot))
            });
            if serves {
                let port = fields[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|port| port.parse::<u16>().ok());
                if let Some(index) = self.nodes.iter().position(|node| Some(node.port()) == port) {
                    return Ok(index);
                }
            }
        }
        Err(format!("no master serves slot {slot} of {key:?}:\n{nodes}"))
    }

    /// The port of node `index`.
    pub fn port(&self, index: usize) -> Option<u16> {
        self.nodes.get(index).map(ServerProcess::port)
    }

    /// Kills node `index` (as a crash would).
    pub fn kill(&mut self, index: usize) {
        if let Some(node) = self.nodes.get_mut(index) {
            node.kill();
        }
    }

    fn live_port(&self) -> Result<u16> {
        self.nodes
            .iter()
            .map(ServerProcess::port)
            .find(|&port| command(port, &["PING"]).is_ok())
            .ok_or_else(|| "no Cluster node answers".to_owned())
    }

    /// The tail of every node's log.
    pub fn log_tails(&self) -> String {
        self.nodes
            .iter()
            .map(ServerProcess::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A master, one replica, and three sentinels (quorum 2) watching them.
#[derive(Debug)]
pub struct RedisSentinel {
    master: ServerProcess,
    replica: ServerProcess,
    sentinels: Vec<ServerProcess>,
}

impl RedisSentinel {
    /// Starts the group and waits until every sentinel sees the replica and
    /// the other two sentinels (needed to agree on a failover). The master
    /// is declared down after 1 s without answers.
    pub fn start() -> Result<RedisSentinel> {
        let master = start_server("redis-sentinel-master", &[])?;
        let replica_of = [
            "--replicaof".to_owned(),
            "127.0.0.1".to_owned(),
            master.port().to_string(),
        ];
        let replica = start_server("redis-sentinel-replica", &replica_of)?;
        let program = require_program("redis-server")?;
        let master_port = master.port();
        let sentinels = (0..3)
            .map(|index| {
                let mut sentinel =
                    ServerProcess::start(&format!("redis-sentinel-{index}"), &program, |dir, port| {
                        let config = dir.join("sentinel.conf");
                        let text = format!(
                            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
                         sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                         sentinel down-after-milliseconds {name} 1000\n\
                         sentinel failover-timeout {name} 10000\n\
                         sentinel parallel-syncs {name} 1\n",
                            dir = dir.display(),
                            name = SENTINEL_MASTER_NAME,
                        );
                        std::fs::write(&config, text)
                            .map_err(|error| format!("writing {}: {error}", config.display()))?;
                        Ok(vec![config.display().to_string(), "--sentinel".to_owned()])
                    })?;
                wait_ping(&mut sentinel)?;
                Ok(sentinel)
            })
            .collect::<Result<Vec<_>>>()?;
        let group = RedisSentinel {
            master,
            replica,
            sentinels,
        };
        group.wait_healthy()?;
        Ok(group)
    }

    fn wait_healthy(&self) -> Result {
        let ports: Vec<u16> = self.sentinels.iter().map(ServerProcess::port).collect();
        let replica = self.replica.port();
        wait_until("the Sentinel group to be ready", || {
            let synced = command(replica, &["INFO", "replication"])
                .map(Reply::text)
                .is_ok_and(|info| info.contains("master_link_status:up"));
            synced
                && ports.iter().all(|&port| {
                    let fields = command(port, &["SENTINEL", "MASTER", SENTINEL_MASTER_NAME])
                        .map(Reply::pairs)
                        .unwrap_or_default();
                    let field = |name: &str| {
                        fields
                            .iter()
                            .find(|(key, _)| key == name)
                            .map(|(_, value)| value.clone())
                            .unwrap_or_default()
                    };
                    field("num-slaves") == "1" && field("num-other-sentinels") == "2"
                })
        })
    }

    /// The sentinels' URLs.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|sentinel| url(sentinel.port()))
            .collect()
    }

    /// The URL of the server that was master at the start.
    pub fn master_url(&self) -> String {
        url(self.master.port())
    }

    /// The URL of the server that was the replica at the start.
    pub fn replica_url(&self) -> String {
        url(self.replica.port())
    }

    /// Kills the original master (as a crash would).
    pub fn kill_master(&mut self) {
        self.master.kill();
    }

    /// Waits until the sentinels name the original replica as master.
    pub fn wait_failover(&self) -> Result {
        let replica = self.replica.port().to_string();
        let sentinel = self
            .sentinels
            .first()
            .map(ServerProcess::port)
            .unwrap_or_default();
        wait_until("the sentinels to promote the replica", || {
            let named = command(
                sentinel,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER_NAME],
            )
            .map(Reply::text)
            .unwrap_or_default();
            let promoted = command(self.replica.port(), &["ROLE"])
                .map(Reply::text)
                .is_ok_and(|role| role.starts_with("master"));
            named.contains(&replica) && promoted
        })
    }

    /// The tail of every process's log.
    pub fn log_tails(&self) -> String {
        [&self.master, &self.replica]
            .into_iter()
            .chain(&self.sentinels)
            .map(ServerProcess::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Waits until every replica of the master on `port` has acknowledged all
/// the writes the master has made so far (its `master_repl_offset`). Unlike
/// `WAIT`, which only covers the calling connection's own writes, this
/// covers writes made by any client.
pub fn wait_replicated(port: u16) -> Result {
    let info = |port| command(port, &["INFO", "replication"]).map(Reply::text);
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    let target = field(&info(port)?, "master_repl_offset:").ok_or("no master_repl_offset")?;
    wait_until("the replicas to acknowledge the master's writes", || {
        let Ok(text) = info(port) else { return false };
        let offsets: Vec<u64> = text
            .lines()
            .filter(|line| line.starts_with("slave"))
            .filter_map(|line| {
                line.split(',')
                    .find_map(|part| part.strip_prefix("offset="))
                    .and_then(|offset| offset.parse().ok())
            })
            .collect();
        !offsets.is_empty() && offsets.iter().all(|&offset| offset >= target)
    })
}

/// Polls `ready` (with growing pauses up to 100 ms) for up to 30 s.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) -> Result {
    let deadline = Instant::now() + READY_WITHIN;
    let mut pauses = Pauses::new();
    while !ready() {
        if Instant::now() >= deadline {
            return Err(format!("timed out after {READY_WITHIN:?} waiting for {what}"));
        }
        pauses.sleep();
    }
    Ok(())
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+...`
    Status(String),
    /// `-...`
    Error(String),
    /// `:...`
    Integer(i64),
    /// `$...` (None for a null bulk string)
    Bulk(Option<String>),
    /// `*...` (None for a null array)
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The text of a status or bulk reply; array elements joined by newlines.
    pub fn text(self) -> String {
        match self {
            Reply::Status(text) | Reply::Error(text) | Reply::Bulk(Some(text)) => text,
            Reply::Integer(number) => number.to_string(),
            Reply::Bulk(None) | Reply::Array(None) => String::new(),
            Reply::Array(Some(items)) => items.into_iter().map(Reply::text).collect::<Vec<_>>().join("\n"),
        }
    }

    /// A flat array of alternating names and values, as pairs.
    pub fn pairs(self) -> Vec<(String, String)> {
        let Reply::Array(Some(items)) = self else {
            return Vec::new();
        };
        items
            .chunks(2)
            .filter_map(|pair| match pair {
                [name, value] => Some((name.clone().text(), value.clone().text())),
                _ => None,
            })
            .collect()
    }
}

/// Sends one command to the server on `port` and reads its reply (1 s limit).
/// A `-ERR` reply is an error.
pub fn command(port: u16, arguments: &[&str]) -> Result<Reply> {
    let stream =
        TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|error| format!("port {port}: {error}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .map_err(|error| error.to_string())?;
    let mut request = format!("*{}\r\n", arguments.len());
    for argument in arguments {
        request.push_str(&format!("${}\r\n{argument}\r\n", argument.len()));
    }
    (&stream)
        .write_all(request.as_bytes())
        .map_err(|error| format!("port {port}: {error}"))?;
    let mut reader = BufReader::new(&stream);
    match read_reply(&mut reader)? {
        Reply::Error(message) => Err(format!("port {port}: {message}")),
        reply => Ok(reply),
    }
}

fn read_reply(reader: &mut impl BufRead) -> Result<Reply> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|error| error.to_string())?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at_checked(1).ok_or("empty reply")?;
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| format!("bad RESP header {line:?}"))
    };
    Ok(match kind {
        "+" => Reply::Status(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Integer(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Reply::Bulk(None),
            Ok(length) => {
                let mut body = vec![0; length + 2];
                std::io::Read::read_exact(reader, &mut body).map_err(|error| error.to_string())?;
                body.truncate(length);
                Reply::Bulk(Some(String::from_utf8_lossy(&body).into_owned()))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Reply::Array(None),
            Ok(count) => Reply::Array(Some(
                (0..count).map(|_| read_reply(reader)).collect::<Result<_>>()?,
            )),
        },
        _ => return Err(format!("unexpected RESP reply {line:?}")),
    })
}
