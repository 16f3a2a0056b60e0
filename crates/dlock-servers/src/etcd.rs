//! An etcd cluster of N members on loopback, with kill, restart and
//! leader lookup for fault tests.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use crate::process::Pauses;
use crate::{Result, ServerProcess, free_port, require_program};

/// How long the cluster may take to become healthy.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// An etcd cluster; every member is killed when it is dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<ServerProcess>,
    /// Per member, a plain-HTTP port serving `/health` (also with TLS).
    metrics: Vec<u16>,
    scheme: &'static str,
}

/// Certificate and key files for members that serve clients over TLS.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The server certificate (PEM), valid for 127.0.0.1.
    pub cert_file: std::path::PathBuf,
    /// Its private key (PEM).
    pub key_file: std::path::PathBuf,
}

impl EtcdCluster {
    /// Starts `size` members (etcd's default heartbeat of 100 ms and
    /// election timeout of 1 s, which a busy 2-core machine keeps up with;
    /// a killed leader is replaced within a few seconds; the shortest lease
    /// is then 2 s) and waits until all report healthy.
    pub fn start(size: usize) -> Result<EtcdCluster> {
        Self::start_with(size, None)
    }

    /// Like [`start`](Self::start), with clients served over TLS (`https://`).
    pub fn start_tls(size: usize, tls: &EtcdTls) -> Result<EtcdCluster> {
        Self::start_with(size, Some(tls))
    }

    fn start_with(size: usize, tls: Option<&EtcdTls>) -> Result<EtcdCluster> {
        let program = require_program("etcd")?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let metrics: Vec<u16> = (0..size).map(|_| free_port()).collect::<Result<_>>()?;
        let peers: Vec<u16> = (0..size).map(|_| free_port()).collect::<Result<_>>()?;
        let initial_cluster = peers
            .iter()
            .enumerate()
            .map(|(index, port)| format!("m{index}=http://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (index, peer) in peers.iter().enumerate() {
            let initial_cluster = initial_cluster.clone();
            let metrics_url = format!("http://127.0.0.1:{}", metrics[index]);
            let member = ServerProcess::start(&format!("etcd-m{index}"), &program, |dir, port| {
                let client = format!("{scheme}://127.0.0.1:{port}");
                let peer = format!("http://127.0.0.1:{peer}");
                let mut arguments: Vec<String> = [
                    "--name",
                    &format!("m{index}"),
                    "--data-dir",
                    &dir.join("data").display().to_string(),
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                    "--initial-cluster",
                    &initial_cluster,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "dlock-test",
                    "--heartbeat-interval",
                    "100",
                    "--election-timeout",
                    "1000",
                    "--listen-metrics-urls",
                    &metrics_url,
                ]
                .map(str::to_owned)
                .to_vec();
                if let Some(tls) = tls {
                    arguments.extend([
                        "--cert-file".to_owned(),
                        tls.cert_file.display().to_string(),
                        "--key-file".to_owned(),
                        tls.key_file.display().to_string(),
                    ]);
                }
                Ok(arguments)
            })?;
            members.push(member);
        }
        let cluster = EtcdCluster {
            members,
            metrics,
            scheme,
        };
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    /// Waits until every running member reports healthy (which needs a leader).
    pub fn wait_healthy(&self) -> Result {
        let deadline = Instant::now() + READY_WITHIN;
        let mut pauses = Pauses::new();
        loop {
            let healthy = self
                .members
                .iter()
                .zip(&self.metrics)
                .filter(|(member, _)| member.is_running())
                .all(|(_, &metrics)| {
                    http(metrics, "GET", "/health", "").is_ok_and(|body| body.contains("\"true\""))
                });
            if healthy {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the etcd cluster was not healthy within {READY_WITHIN:?}:\n{}",
                    self.log_tails()
                ));
            }
            pauses.sleep();
        }
    }

    /// Client endpoints of every member (`http://127.0.0.1:port`).
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| format!("{}://127.0.0.1:{}", self.scheme, member.port()))
            .collect()
    }

    /// The index of the current leader, asked of any live member (plain
    /// HTTP clusters only).
    pub fn leader(&self) -> Result<usize> {
        let mut ids = Vec::new();
        let mut leader = None;
        for member in &self.members {
            let status = if member.is_running() {
                http(member.port(), "POST", "/v3/maintenance/status", "{}").unwrap_or_default()
            } else {
                String::new()
            };
            ids.push(json_number(&status, "member_id"));
            leader = leader.or(json_number(&status, "leader"));
        }
        let leader = leader.ok_or("no member names a leader")?;
        ids.iter()
            .position(|id| *id == Some(leader))
            .ok_or_else(|| format!("the leader {leader} is not a running member (members: {ids:?})"))
    }

    /// Kills member `index` (as a crash would).
    pub fn kill(&mut self, index: usize) {
        if let Some(member) = self.members.get_mut(index) {
            member.kill();
        }
    }

    /// Starts member `index` again with its data.
    pub fn restart(&mut self, index: usize) -> Result {
        self.members
            .get_mut(index)
            .ok_or_else(|| format!("no member {index}"))?
            .restart()
    }

    /// The tail of every member's log.
    pub fn log_tails(&self) -> String {
        self.members
            .iter()
            .map(ServerProcess::log_tail)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The number after `"name":` (etcd's JSON gateway quotes 64-bit numbers).
fn json_number(json: &str, name: &str) -> Option<u64> {
    let start = json.find(&format!("\"{name}\":"))? + name.len() + 3;
    let digits: String = json[start..]
        .chars()
        .skip_while(|c| *c == '"' || *c == ' ')
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A minimal HTTP/1.0 request; returns the body.
fn http(port: u16, method: &str, path: &str, body: &str) -> Result<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).map_err(|error| error.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|error| error.to_string())?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|error| error.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|error| error.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP body")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or_default().to_owned());
    }
    Ok(body.to_owned())
}
