//! `EtcdBackend` on an etcd with auth enabled, started by this test: a user
//! whose role covers only the `/dlock/` prefix can lock; a wrong password
//! is refused with a clear error that does not show the password.

use std::time::Duration;

use dlock_core::Locker;
use dlock_etcd::EtcdBackend;
use dlock_servers::etcd::EtcdCluster;
use dlock_tests::assert_unavailable_within;
use etcd_client::{Client, ConnectOptions, Permission};
use tokio::task::spawn_blocking;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_limited_to_the_prefix_can_lock_and_a_wrong_password_cannot() {
    let cluster = match spawn_blocking(|| EtcdCluster::start(1)).await {
        Ok(Ok(cluster)) => cluster,
        Ok(Err(message)) => panic!("{message}"),
        Err(error) => panic!("cluster setup panicked: {error}"),
    };
    let endpoints = cluster.endpoints();
    let mut admin = Client::connect(&endpoints, None).await.expect("admin");
    admin
        .user_add("root", "root-password", None)
        .await
        .expect("add root");
    admin.role_add("root").await.expect("add the root role");
    admin.user_grant_role("root", "root").await.expect("grant root");
    admin.role_add("dlock").await.expect("add role");
    admin
        .role_grant_permission("dlock", Permission::read_write("/dlock/").with_prefix())
        .await
        .expect("grant the prefix");
    admin
        .user_add("locker", "right-password", None)
        .await
        .expect("add user");
    admin
        .user_grant_role("locker", "dlock")
        .await
        .expect("grant role");
    admin.auth_enable().await.expect("enable auth");

    let backend = EtcdBackend::builder(&endpoints)
        .user("locker", "right-password")
        .connect()
        .await
        .expect("connect as the limited user");
    let locker = Locker::new(backend);
    let guard = locker
        .lock("auth/job")
        .ttl(Duration::from_secs(5))
        .await
        .expect("lock");
    let token = guard.fencing_token();
    guard.release().await.expect("release");
    let again = locker.try_lock("auth/job").await.expect("lock again");
    assert!(again.fencing_token() > token);
    again.release().await.expect("release");

    // Outside its prefix the user may not write: the role really limits it.
    let options = ConnectOptions::new().with_user("locker", "right-password");
    let mut limited = Client::connect(&endpoints, Some(options)).await.expect("connect");
    assert!(
        limited.put("/elsewhere", "x", None).await.is_err(),
        "a write outside /dlock/ must be refused"
    );

    let message = assert_unavailable_within(
        Duration::from_secs(5),
        EtcdBackend::builder(&endpoints)
            .user("locker", "wrong-password")
            .connect(),
    )
    .await;
    assert!(message.contains("authentication failed"), "{message}");
    assert!(
        !message.contains("wrong-password"),
        "the password leaked: {message}"
    );
}
