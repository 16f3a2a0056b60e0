//! The command as a job: its own process group, which gets the terminal's
//! foreground when dlock has it, stops and continues together with dlock,
//! receives every terminating signal dlock receives, is waited for as a
//! whole, and dies with dlock.
//!
//! The command is started through dlock's own binary ([`LAUNCH`]): in the
//! child, before `exec`, it asks for SIGKILL when dlock dies (Linux's
//! parent-death signal) and takes the terminal for its group. Doing that
//! in the child between `fork` and `exec` would need `unsafe` code; a
//! second `exec` of our own binary needs none.

use std::ffi::CString;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, killpg, pthread_sigmask, sigprocmask};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::{Pid, getpgrp, getpid, getppid, tcgetpgrp, tcsetpgrp};
use tokio::signal::unix::{Signal as SignalStream, SignalKind, signal};
use tokio::time::sleep;

/// The hidden first argument with which dlock starts the command through
/// itself: `dlock __launch PARENT_PID TAKE_TERMINAL -- COMMAND...`.
pub(crate) const LAUNCH: &str = "__launch";

/// Signals that end a process by default and that dlock passes on to the
/// command's group instead of dying of them (SIGKILL cannot be caught: the
/// parent-death signal covers it).
const PASSED_ON: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGTERM,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
];

/// The child side of [`LAUNCH`]: runs in the command's new process group
/// and replaces itself with the command. Returns only on failure, with the
/// exit code (127, as shells use for a command that cannot be run).
pub(crate) fn launch(arguments: &[String]) -> u8 {
    let [parent, take_terminal, separator, command @ ..] = arguments else {
        eprintln!("dlock: {LAUNCH} is internal to `dlock run`");
        return 127;
    };
    if separator != "--" || command.is_empty() {
        eprintln!("dlock: {LAUNCH} is internal to `dlock run`");
        return 127;
    }
    // Dies with dlock, even of SIGKILL. If dlock died before this line,
    // the parent is someone else already: do not start at all.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if parent.parse::<i32>().ok() != Some(getppid().as_raw()) {
        return 127;
    }
    if take_terminal == "1" {
        let stdin = std::io::stdin();
        // From a background group this would stop us with SIGTTOU unless
        // it is blocked; it is unblocked again below, before `exec`.
        let _ = with_sigttou_blocked(|| tcsetpgrp(stdin.as_fd(), getpgrp()));
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let arguments: Result<Vec<CString>, _> =
        command.iter().map(|part| CString::new(part.as_bytes())).collect();
    let Ok(arguments) = arguments else {
        eprintln!("dlock: the command has a NUL byte");
        return 127;
    };
    let error = match nix::unistd::execvp(&arguments[0], &arguments) {
        Err(error) => error,
        Ok(never) => match never {},
    };
    eprintln!("dlock: could not start {:?}: {error}", command[0]);
    127
}

/// Runs `change` with SIGTTOU blocked on this thread: a process in a
/// background group may then set the terminal's foreground group.
fn with_sigttou_blocked<T>(change: impl FnOnce() -> T) -> T {
    let mut ttou = SigSet::empty();
    ttou.add(Signal::SIGTTOU);
    let mut before = SigSet::empty();
    let blocked = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&ttou), Some(&mut before)).is_ok();
    let outcome = change();
    if blocked {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&before), None);
    }
    outcome
}

/// Whether dlock runs in the foreground of the terminal on its standard
/// input (so the command should get that foreground).
fn in_terminal_foreground() -> bool {
    let stdin = std::io::stdin();
    stdin.is_terminal() && tcgetpgrp(stdin.as_fd()).is_ok_and(|group| group == getpgrp())
}

/// Gives the terminal's foreground to `group` (dlock's own, or the command's).
fn hand_terminal_to(group: Pid) {
    let stdin = std::io::stdin();
    let _ = with_sigttou_blocked(|| tcsetpgrp(stdin.as_fd(), group));
}

/// The signals dlock catches while the command runs: those it passes on,
/// a stop request, a continue, and a child's change of state.
pub(crate) struct Signals {
    passed_on: Vec<(Signal, SignalStream)>,
    stop: Option<SignalStream>,
    resumed: Option<SignalStream>,
    child: Option<SignalStream>,
}

/// What [`Signals::next`] saw.
pub(crate) enum Event {
    /// A signal to pass on to the command's group.
    PassOn(Signal),
    /// SIGTSTP: stop the job.
    Stop,
    /// SIGCONT: dlock was continued.
    Resumed,
    /// SIGCHLD: a child changed state.
    Child,
}

impl Signals {
    /// Catches them from now on: a signal that arrives while dlock
    /// acquires or starts the command no longer ends dlock before its
    /// clean-up.
    pub(crate) fn install() -> Self {
        let catch = |signal: Signal| tokio::signal::unix::signal(SignalKind::from_raw(signal as i32)).ok();
        Signals {
            passed_on: PASSED_ON
                .iter()
                .filter_map(|&which| Some((which, catch(which)?)))
                .collect(),
            stop: catch(Signal::SIGTSTP),
            resumed: catch(Signal::SIGCONT),
            child: signal(SignalKind::child()).ok(),
        }
    }

    /// The next signal; never resolves if none can be caught.
    pub(crate) async fn next(&mut self) -> Event {
        let catching = !self.passed_on.is_empty();
        let streams = self
            .passed_on
            .iter_mut()
            .map(|(which, stream)| Box::pin(async move { stream.recv().await.map(|()| *which) }));
        let passed_on = async move {
            if !catching {
                return std::future::pending().await;
            }
            match futures_util::future::select_all(streams).await.0 {
                Some(which) => which,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            which = passed_on => Event::PassOn(which),
            Some(()) = recv(&mut self.stop) => Event::Stop,
            Some(()) = recv(&mut self.resumed) => Event::Resumed,
            Some(()) = recv(&mut self.child) => Event::Child,
        }
    }

    /// Waits for the next SIGCONT.
    async fn resumed(&mut self) {
        if recv(&mut self.resumed).await.is_none() {
            std::future::pending::<()>().await;
        }
    }
}

async fn recv(stream: &mut Option<SignalStream>) -> Option<()> {
    match stream {
        Some(stream) => stream.recv().await,
        None => std::future::pending().await,
    }
}

/// The command's process group, started through [`launch`].
pub(crate) struct Job {
    group: Pid,
    /// Whether the command got the terminal's foreground (dlock had it).
    owns_terminal: bool,
    stopped: bool,
}

impl Job {
    /// Starts `command` in a process group of its own, through dlock's
    /// binary; `prepare` adds to the launcher's settings (environment).
    ///
    /// Call it on a thread that lives as long as the command (the runtime's
    /// main or worker threads, not a blocking-pool thread): Linux sends the
    /// parent-death signal when the thread that started the child ends.
    pub(crate) fn spawn(
        command: &[String],
        prepare: impl FnOnce(&mut tokio::process::Command),
    ) -> std::io::Result<(Job, tokio::process::Child)> {
        let owns_terminal = in_terminal_foreground();
        let mut launcher = tokio::process::Command::new(std::env::current_exe()?);
        launcher
            .arg(LAUNCH)
            .arg(getpid().as_raw().to_string())
            .arg(if owns_terminal { "1" } else { "0" })
            .arg("--")
            .args(command)
            .process_group(0);
        prepare(&mut launcher);
        let child = launcher.spawn()?;
        let group = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
            .ok_or_else(|| std::io::Error::other("the command exited before it could be watched"))?;
        if owns_terminal {
            // The launcher takes it too; whichever runs first, the command
            // never reads the terminal from the background.
            hand_terminal_to(group);
        }
        Ok((
            Job {
                group,
                owns_terminal,
                stopped: false,
            },
            child,
        ))
    }

    /// Sends `signal` to every process of the group; a stopped group is
    /// continued so that it can act on it.
    pub(crate) fn signal(&self, signal: Signal) {
        // An error means the group is gone already.
        let _ = killpg(self.group, signal);
        if self.stopped && signal != Signal::SIGCONT {
            let _ = killpg(self.group, Signal::SIGCONT);
        }
    }

    /// Whether any process of the group is left.
    pub(crate) fn group_alive(&self) -> bool {
        killpg(self.group, None).is_ok()
    }

    /// Resolves when no process of the group is left (the command's own
    /// children included), looking every 20 ms.
    pub(crate) async fn group_gone(&self) {
        while self.group_alive() {
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Handles a signal dlock received while the command runs.
    pub(crate) async fn on_event(&mut self, event: Event, signals: &mut Signals) {
        match event {
            Event::PassOn(which) => self.signal(which),
            // Stopping the group makes it report a stop (below), upon which
            // dlock stops too.
            Event::Stop => self.signal(Signal::SIGTSTP),
            Event::Resumed => self.resume(),
            Event::Child => {
                let flags = WaitPidFlag::WSTOPPED | WaitPidFlag::WCONTINUED | WaitPidFlag::WNOHANG;
                if let Ok(WaitStatus::Stopped(..)) = waitid(Id::Pid(self.group), flags) {
                    self.stop_with_the_command(signals).await;
                }
            }
        }
    }

    /// The command stopped (Ctrl-Z, SIGTTIN, SIGSTOP): dlock stops too, so
    /// that the shell sees the job stopped and gets its terminal back, and
    /// continues the command when it is continued itself.
    async fn stop_with_the_command(&mut self, signals: &mut Signals) {
        self.stopped = true;
        tracing::info!("the command stopped; stopping dlock with it (renewal pauses)");
        self.take_terminal_back();
        // Continued by the shell's `fg` or `bg` (SIGCONT), dlock hands the
        // terminal on again and continues the command.
        let _ = kill(getpid(), Signal::SIGSTOP);
        signals.resumed().await;
        self.resume();
    }

    /// dlock was continued: so is the command, with the terminal if dlock
    /// is in the foreground again (`fg`), without it otherwise (`bg`).
    fn resume(&mut self) {
        if self.owns_terminal && in_terminal_foreground() {
            hand_terminal_to(self.group);
        }
        self.stopped = false;
        let _ = killpg(self.group, Signal::SIGCONT);
    }

    /// The command is done: dlock takes the terminal back.
    pub(crate) fn finish(&self) {
        self.take_terminal_back();
    }

    /// Gives the terminal back to dlock's group, if the command's has it
    /// (after a `bg` the shell has it, and keeps it).
    fn take_terminal_back(&self) {
        let stdin = std::io::stdin();
        if self.owns_terminal && tcgetpgrp(stdin.as_fd()).is_ok_and(|group| group == self.group) {
            hand_terminal_to(getpgrp());
        }
    }
}
