//! `EtcdBackend` over TLS (`https://`) to a single-member etcd this test
//! starts with certificates it creates.

use std::time::Duration;

use dlock_core::Locker;
use dlock_etcd::EtcdBackend;
use dlock_servers::etcd::{EtcdCluster, EtcdTls};
use dlock_tests::{TestCertificates, assert_unavailable_within};
use tokio::task::spawn_blocking;

async fn tls_cluster(certificates: &TestCertificates) -> EtcdCluster {
    let tls = EtcdTls {
        cert_file: certificates.cert_file.clone(),
        key_file: certificates.key_file.clone(),
    };
    match spawn_blocking(move || EtcdCluster::start_tls(1, &tls)).await {
        Ok(Ok(cluster)) => cluster,
        Ok(Err(message)) => panic!("{message}"),
        Err(error) => panic!("cluster setup panicked: {error}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_over_tls_with_a_private_authority() {
    let certificates = TestCertificates::create();
    let cluster = tls_cluster(&certificates).await;
    let endpoints = cluster.endpoints();
    assert!(endpoints[0].starts_with("https://"));
    let backend = EtcdBackend::builder(&endpoints)
        .tls_root_certificates(certificates.ca_pem.clone())
        .connect()
        .await
        .expect("connect over TLS");
    let locker = Locker::new(backend);
    let first = locker
        .lock("tls/job")
        .ttl(Duration::from_secs(5))
        .await
        .expect("lock");
    let token = first.fencing_token();
    first.release().await.expect("release");
    let second = locker.try_lock("tls/job").await.expect("lock again");
    assert!(second.fencing_token() > token);
    second.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused() {
    let certificates = TestCertificates::create();
    let cluster = tls_cluster(&certificates).await;
    // The system trust store does not know the test's private authority.
    let untrusted = EtcdBackend::builder(cluster.endpoints())
        .connect_timeout(Duration::from_secs(2))
        .connect();
    assert_unavailable_within(Duration::from_secs(5), untrusted).await;
}
