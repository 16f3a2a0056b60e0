//! Makes sure the system programs the suites need are installed.

use std::path::Path;
use std::process::Command;

use crate::Result;

/// A program (or, when it starts with `/`, a file) and the Debian package
/// that ships it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tool {
    pub(crate) program: &'static str,
    pub(crate) package: &'static str,
}

impl Tool {
    fn is_present(&self) -> bool {
        if self.program.starts_with('/') {
            Path::new(self.program).is_file()
        } else {
            find_program(self.program).is_some()
        }
    }
}

pub(crate) const REDIS_SERVER: Tool = Tool {
    program: "redis-server",
    package: "redis-server",
};
pub(crate) const REDIS_CLI: Tool = Tool {
    program: "redis-cli",
    package: "redis-tools",
};
pub(crate) const ETCD: Tool = Tool {
    program: "etcd",
    package: "etcd-server",
};
/// etcd's own client: the election suite checks that it sees dlock's leader.
pub(crate) const ETCDCTL: Tool = Tool {
    program: "etcdctl",
    package: "etcd-client",
};
pub(crate) const PROTOC: Tool = Tool {
    program: "protoc",
    package: "protobuf-compiler",
};
/// A pseudo-terminal for the CLI's job-control tests (util-linux `script`).
pub(crate) const SCRIPT: Tool = Tool {
    program: "script",
    package: "bsdutils",
};
/// The well-known `.proto` files that etcd-client's build imports.
pub(crate) const PROTOBUF_INCLUDES: Tool = Tool {
    program: "/usr/include/google/protobuf/descriptor.proto",
    package: "libprotobuf-dev",
};

/// Everything any suite may need (`cargo xtask deps`).
pub(crate) const ALL: &[Tool] = &[
    REDIS_SERVER,
    REDIS_CLI,
    ETCD,
    ETCDCTL,
    SCRIPT,
    PROTOC,
    PROTOBUF_INCLUDES,
];

/// Installs the missing tools with apt-get when running as root, or fails
/// with the exact command to run.
pub(crate) fn ensure(tools: &[Tool]) -> Result {
    let missing: Vec<Tool> = tools.iter().copied().filter(|tool| !tool.is_present()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|tool| tool.package).collect();
    packages.dedup();
    let programs: Vec<&str> = missing.iter().map(|tool| tool.program).collect();
    let install = format!(
        "apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    );
    if !is_root() || find_program("apt-get").is_none() {
        return Err(format!(
            "missing {}; install them with:\n    sudo apt-get update && sudo {install}\nthen run the xtask command again",
            programs.join(", ")
        ));
    }
    println!(
        "xtask: {} missing; installing Debian packages: {}",
        programs.join(", "),
        packages.join(" ")
    );
    apt(&["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&packages);
    apt(&args)?;
    let still_missing: Vec<&str> = missing
        .iter()
        .filter(|tool| !tool.is_present())
        .map(|tool| tool.program)
        .collect();
    if still_missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{install} ran, but {} is still not on PATH",
            still_missing.join(", ")
        ))
    }
}

fn apt(args: &[&str]) -> Result {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|error| format!("could not run apt-get: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("apt-get {} failed with {status}", args.join(" ")))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

pub(crate) use dlock_servers::find_program;
