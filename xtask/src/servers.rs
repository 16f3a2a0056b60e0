//! The real servers the integration suites run against, and the environment
//! variables that hand their addresses to the tests.

use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use crate::Result;
use crate::deps::{self, Tool};
use crate::process::ServerProcess;

/// The system programs the servers below need.
pub(crate) const NEEDED: &[Tool] = &[deps::REDIS_SERVER];

/// Environment variable with the URL of a single redis-server.
pub(crate) const REDIS_URL_VAR: &str = "DLOCK_TEST_REDIS_URL";

/// The servers of one run; all are stopped when this is dropped.
#[derive(Debug)]
pub(crate) struct Servers {
    redis: ServerProcess,
}

impl Servers {
    /// The variables that tell the suites where the servers are.
    pub(crate) fn environment(&self) -> Vec<(&'static str, String)> {
        vec![(
            REDIS_URL_VAR,
            format!("redis://127.0.0.1:{}/0", self.redis.port()),
        )]
    }

    /// Prints the tail of every server's log (after a failed suite).
    pub(crate) fn dump_logs(&self) {
        eprintln!("{}", self.redis.log_tail());
    }
}

/// Starts every server the suites need.
pub(crate) fn start_all() -> Result<Servers> {
    Ok(Servers {
        redis: start_redis()?,
    })
}

fn start_redis() -> Result<ServerProcess> {
    let program = deps::find_program(deps::REDIS_SERVER.program)
        .ok_or("redis-server is not installed; run `cargo xtask deps`")?;
    let mut server = ServerProcess::start("redis-server", &program, |dir, port| {
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
    })?;
    server.wait_ready(Duration::from_secs(20), redis_answers_ping)?;
    Ok(server)
}

/// Sends `PING` and expects `+PONG`.
fn redis_answers_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// `cargo xtask servers`: start everything, print the environment, wait for Enter.
pub(crate) fn interactive() -> Result {
    deps::ensure(NEEDED)?;
    let servers = start_all()?;
    for (name, value) in servers.environment() {
        println!("export {name}={value}");
    }
    println!("# servers are running; press Enter to stop them");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    drop(servers);
    Ok(())
}
