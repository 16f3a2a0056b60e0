//! `RedisBackend` over TLS (`rediss://`) to a redis-server this test starts
//! with certificates it creates.

use std::time::Duration;

use dlock_core::Locker;
use dlock_redis::RedisBackend;
use dlock_servers::redis as servers;
use dlock_servers::{ServerProcess, free_port};
use dlock_tests::{TestCertificates, assert_unavailable_within};
use tokio::task::spawn_blocking;

/// A redis-server with a plain port (for readiness) and a TLS port.
async fn tls_server(certificates: &TestCertificates) -> (ServerProcess, u16) {
    let tls_port = free_port().expect("port");
    let arguments: Vec<String> = [
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &certificates.cert_file.display().to_string(),
        "--tls-key-file",
        &certificates.key_file.display().to_string(),
        "--tls-ca-cert-file",
        &certificates.ca_file.display().to_string(),
        "--tls-auth-clients",
        "no",
    ]
    .map(str::to_owned)
    .to_vec();
    let server = match spawn_blocking(move || servers::start_server("redis-tls", &arguments)).await {
        Ok(Ok(server)) => server,
        Ok(Err(message)) => panic!("{message}"),
        Err(error) => panic!("server setup panicked: {error}"),
    };
    (server, tls_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_over_tls_with_a_private_authority() {
    let certificates = TestCertificates::create();
    let (server, port) = tls_server(&certificates).await;
    let url = format!("rediss://127.0.0.1:{port}/0");
    // Waiters renew their places every 30 s: only the hand-over message
    // (pub/sub over TLS) can wake one sooner.
    let connect = || {
        RedisBackend::builder(&url)
            .tls_root_certificates(certificates.ca_pem.clone())
            .waiter_renewal(Duration::from_secs(30))
            .connect()
    };
    let names = connect().await.expect("connect over TLS");
    let holder = Locker::new(names.clone());
    let waiter = Locker::new(connect().await.expect("connect over TLS"));
    let guard = holder
        .lock("tls/job")
        .ttl(Duration::from_secs(30))
        .await
        .expect("lock");
    let waiting = tokio::spawn(async move { waiter.lock("tls/job").wait(Duration::from_secs(5)).await });
    // Wait until the waiter listens for the hand-over (asked on the plain port).
    let line = names.line_key("tls/job");
    assert!(dlock_tests::in_line_within(server.port(), &line, Duration::from_secs(5)).await);
    let first_token = guard.fencing_token();
    guard.release().await.expect("release");
    // The holder's TTL is 30 s: only the hand-over message (pub/sub over
    // TLS) gets the waiter in within its 5 s wait.
    let next = waiting.await.expect("waiter task").expect("woken by the release");
    assert!(next.fencing_token() > first_token);
    next.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused() {
    let certificates = TestCertificates::create();
    let (_server, port) = tls_server(&certificates).await;
    // The system trust store does not know the test's private authority.
    let untrusted = RedisBackend::builder(&format!("rediss://127.0.0.1:{port}/0"))
        .connect_timeout(Duration::from_secs(2))
        .connect();
    assert_unavailable_within(Duration::from_secs(5), untrusted).await;
    // Plain text to the TLS port gets no Redis answer either.
    let plain = RedisBackend::builder(&format!("redis://127.0.0.1:{port}/0"))
        .connect_timeout(Duration::from_secs(1))
        .connect();
    assert_unavailable_within(Duration::from_secs(3), plain).await;
}
