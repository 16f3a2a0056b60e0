//! The servers started by `cargo xtask integration` are really there.

use std::io::{Read, Write};
use std::net::TcpStream;

#[test]
fn redis_server_from_xtask_answers() {
    let url = dlock_tests::redis_url();
    let address = url
        .strip_prefix("redis://")
        .and_then(|rest| rest.split('/').next())
        .expect("DLOCK_TEST_REDIS_URL has the form redis://host:port/db");
    let mut stream = TcpStream::connect(address).expect("connect to the test redis-server");
    stream.write_all(b"PING\r\n").expect("send PING");
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).expect("read the reply");
    assert_eq!(&reply, b"+PONG\r\n");
}
