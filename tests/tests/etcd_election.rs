//! dlock's etcd elections and etcd's own (`etcdctl elect`, which runs
//! `concurrency.Election`) share one layout: each sees the other's leader,
//! and their candidates take turns. etcdctl comes from the Debian package
//! etcd-client, which `cargo xtask` installs with the servers' programs.

use std::process::Stdio;
use std::time::Duration;

use dlock_core::{Leader, Locker};
use dlock_etcd::EtcdBackend;
use dlock_testkit::conformance::unique_key;
use dlock_tests::etcd_endpoints;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::timeout;

/// One `etcdctl elect` process, killed when dropped, and its output.
struct Etcdctl {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Etcdctl {
    /// `etcdctl elect NAME PROPOSAL`: a campaign that leads until interrupted.
    fn campaign(name: &str, proposal: &str) -> Etcdctl {
        Etcdctl::start(&[name, proposal])
    }

    /// `etcdctl elect --listen NAME`: prints every leader's value.
    fn listen(name: &str) -> Etcdctl {
        Etcdctl::start(&["--listen", name])
    }

    fn start(arguments: &[&str]) -> Etcdctl {
        let mut child = Command::new("etcdctl")
            .arg(format!("--endpoints={}", etcd_endpoints().join(",")))
            .arg("elect")
            .args(arguments)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "could not run etcdctl ({error}); run the suites with `cargo xtask integration`, which installs it"
                )
            });
        let stdout = child.stdout.take().expect("etcdctl's stdout is piped");
        Etcdctl {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// Reads output until a line equal to `expected`, within `within`;
    /// false when it does not come.
    async fn prints(&mut self, expected: &str, within: Duration) -> bool {
        let reading = async {
            while let Ok(Some(line)) = self.lines.next_line().await {
                if line == expected {
                    return true;
                }
            }
            false
        };
        timeout(within, reading).await.unwrap_or(false)
    }

    /// Interrupts it, as Ctrl-C does: a campaign resigns, then it exits.
    async fn interrupt(mut self) {
        let pid = self.child.id().expect("etcdctl is running");
        let status = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await
            .expect("run kill");
        assert!(status.success(), "kill -INT {pid} failed");
        let exited = timeout(Duration::from_secs(10), self.child.wait()).await;
        assert!(exited.is_ok(), "etcdctl did not exit within 10 s of an interrupt");
    }
}

/// A client and the election name etcd's tools use for `key`: the queue
/// prefix without its last `/`.
async fn client_and_name(key: &str) -> (Locker, String) {
    let backend = EtcdBackend::connect(etcd_endpoints()).await.expect("connect");
    let name = backend.queue_prefix(key).trim_end_matches('/').to_owned();
    (Locker::new(backend), name)
}

/// The value of whoever leads `election`, as dlock reads it.
async fn leading_value(election: &dlock_core::Election) -> Option<String> {
    election
        .leader()
        .await
        .expect("leader")
        .map(|leader| leader.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_listen_prints_what_a_dlock_leader_proclaims() {
    let key = unique_key("etcdctl_listen");
    let (locker, name) = client_and_name(&key).await;
    let mut listener = Etcdctl::listen(&name);
    let leadership = locker
        .election(&key)
        .campaign("node-a:8080")
        .await
        .expect("leads");
    assert!(
        listener.prints("node-a:8080", Duration::from_secs(10)).await,
        "etcdctl elect --listen did not print the dlock leader's value"
    );
    leadership.proclaim("node-a:9090").await.expect("proclaim");
    assert!(
        listener.prints("node-a:9090", Duration::from_secs(10)).await,
        "etcdctl elect --listen did not print the proclaimed value"
    );
    leadership.resign().await.expect("resign");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_and_dlock_candidates_take_turns() {
    let key = unique_key("etcdctl_turns");
    let (locker, name) = client_and_name(&key).await;
    let election = locker.election(&key);

    // etcdctl leads first; dlock sees it, and waits for it.
    let mut theirs = Etcdctl::campaign(&name, "etcdctl-first");
    assert!(
        theirs.prints("etcdctl-first", Duration::from_secs(10)).await,
        "etcdctl elect did not lead an empty election"
    );
    let Some(Leader {
        value,
        term: their_term,
    }) = election.leader().await.expect("leader")
    else {
        panic!("dlock sees no leader while etcdctl leads");
    };
    assert_eq!(value, "etcdctl-first");
    let campaign = {
        let election = election.clone();
        tokio::spawn(async move { election.campaign("dlock").wait(Duration::from_secs(20)).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!campaign.is_finished(), "dlock led while etcdctl led");
    theirs.interrupt().await; // resigns
    let ours = timeout(Duration::from_secs(10), campaign)
        .await
        .expect("dlock leads once etcdctl resigned")
        .expect("campaign task")
        .expect("campaign");
    assert!(
        ours.term() > their_term,
        "the term rises across both kinds of candidate"
    );
    assert_eq!(leading_value(&election).await.as_deref(), Some("dlock"));

    // Now etcdctl waits for dlock.
    let mut next = Etcdctl::campaign(&name, "etcdctl-second");
    assert!(
        !next.prints("etcdctl-second", Duration::from_secs(1)).await,
        "etcdctl led while dlock led"
    );
    ours.resign().await.expect("resign");
    assert!(
        next.prints("etcdctl-second", Duration::from_secs(10)).await,
        "etcdctl did not lead once dlock resigned"
    );
    assert_eq!(leading_value(&election).await.as_deref(), Some("etcdctl-second"));
    next.interrupt().await;
    assert_eq!(
        election.leader().await.expect("leader"),
        None,
        "nobody leads at the end"
    );
}
