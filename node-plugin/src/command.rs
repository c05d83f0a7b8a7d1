//! One way to run an external command: `LC_ALL=C`, a timeout, killed on drop and when this
//! process dies, stderr kept for the error; and the one thread children tied to this process
//! are started from.

use std::ffi::OsStr;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::error::{Error, Result};

/// How long any helper command may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The command as every helper runs: `LC_ALL=C`, no stdin, killed when dropped and when this
/// process dies.
fn command<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Command {
    let mut command = Command::new(program);
    command.args(args).env("LC_ALL", "C").kill_on_drop(true).stdin(std::process::Stdio::null());
    crate::sys::die_with_parent(&mut command);
    command
}

/// A command to start, the runtime its child belongs to, and where its start is answered.
type Start =
    (Command, tokio::runtime::Handle, tokio::sync::oneshot::Sender<std::io::Result<Child>>);

/// Starts `command` from a thread that lives as long as the process. The kernel signals a
/// child made to die with its parent (`sys::die_with_parent`: `PR_SET_PDEATHSIG`) when the
/// *thread* that started it exits, not the process; an async worker may exit (one that blocked
/// in place becomes a blocking thread, retired when idle), and a copy server or mkfs started
/// from it would be killed mid-work. Every tied child starts here instead.
pub async fn spawn_tied(command: Command) -> std::io::Result<Child> {
    static STARTER: OnceLock<mpsc::Sender<Start>> = OnceLock::new();
    let starter = STARTER.get_or_init(|| {
        let (sender, starts) = mpsc::channel::<Start>();
        std::thread::Builder::new()
            .name("child-starter".into())
            .spawn(move || {
                for (mut command, runtime, answer) in starts {
                    let _entered = runtime.enter(); // the child is reaped by the caller's runtime
                    let _ = answer.send(command.spawn());
                }
            })
            .expect("start the thread that starts children");
        sender
    });
    let (answer, started) = tokio::sync::oneshot::channel();
    let lost = || std::io::Error::other("the thread that starts children is gone");
    starter.send((command, tokio::runtime::Handle::current(), answer)).map_err(|_| lost())?;
    started.await.map_err(|_| lost())?
}

/// Runs `program` with `args` within the timeout; how it exited and what it printed, whatever
/// the exit status (for programs whose status is an answer: e2fsck's 1 is "errors corrected").
pub async fn run_for_status<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
) -> Result<std::process::Output> {
    let mut command = command(program, args);
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let run = async {
        let child = spawn_tied(command).await?;
        child.wait_with_output().await
    };
    tokio::time::timeout(TIMEOUT, run)
        .await
        .map_err(|_| Error::Command {
            program: program.into(),
            stderr: format!("timed out after {} s", TIMEOUT.as_secs()),
        })?
        .map_err(|source| Error::Spawn { program: program.into(), source })
}

/// Runs `program` with `args`; returns its stdout, or an error carrying its stderr.
pub async fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String> {
    let output = run_for_status(program, args).await?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        return Err(Error::Command {
            program: program.into(),
            stderr: if stderr.is_empty() { format!("{}: {stdout}", output.status) } else { stderr },
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Starts `program` with `args`, its stdout and stderr piped, for a caller that streams what
/// it prints: no timeout (the caller reads as long as it needs); dropping the child kills it.
pub async fn spawn_piped<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Child> {
    let mut command = command(program, args);
    command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    spawn_tied(command).await.map_err(|source| Error::Spawn { program: program.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_program_that_cannot_start_keeps_the_os_error_as_its_cause() {
        let e = run("qsd-csi-no-such-program", &["x"]).await.expect_err("not installed");
        assert!(
            matches!(&e, Error::Spawn { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
        );
        let message = e.with_causes();
        assert!(
            message.starts_with("command qsd-csi-no-such-program could not be run: "),
            "{message}"
        );
    }

    /// The kernel kills a child tied with `PR_SET_PDEATHSIG` when the thread that started it
    /// exits. A blocking thread asks for a child, then retires (idle past its keep-alive): the
    /// child lives on, because the thread that started it is the one that never exits.
    #[test]
    fn a_tied_child_outlives_the_thread_that_asked_for_it() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_keep_alive(Duration::from_millis(20))
            .enable_all()
            .build()
            .expect("runtime");
        let handle = runtime.handle().clone();
        let asked = runtime.spawn_blocking(move || {
            let child = handle.block_on(spawn_tied(command("sleep", &["60"]))).expect("sleep");
            // "<pid>/task/<tid>": this thread's entry in /proc, gone once it exits.
            let me = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
            (child, std::path::Path::new("/proc").join(me))
        });
        let (mut child, task) = runtime.block_on(asked).expect("asked");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while task.exists() {
            assert!(std::time::Instant::now() < deadline, "the asking thread never retired");
            std::thread::yield_now();
        }
        // Were the child tied to the thread that asked, SIGKILL would end it at once.
        let wait = async { tokio::time::timeout(Duration::from_secs(2), child.wait()).await };
        let ended = runtime.block_on(wait);
        assert!(ended.is_err(), "the child ended with its asking thread: {ended:?}");
    }

    #[tokio::test]
    async fn a_failing_program_reports_its_stderr() {
        let e = run("sh", &["-c", "echo broken >&2; exit 3"]).await.expect_err("fails");
        assert!(matches!(&e, Error::Command { stderr, .. } if stderr == "broken"), "{e}");
    }
}
