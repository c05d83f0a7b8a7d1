//! One way to run an external command: `LC_ALL=C`, a timeout, killed on drop and when this
//! process dies, stderr kept for the error.

use std::ffi::OsStr;
use std::time::Duration;

use crate::error::{Error, Result};

/// How long any helper command may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The command as every helper runs: `LC_ALL=C`, no stdin, killed when dropped and when this
/// process dies.
fn command<S: AsRef<OsStr>>(program: &str, args: &[S]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command.args(args).env("LC_ALL", "C").kill_on_drop(true).stdin(std::process::Stdio::null());
    crate::sys::die_with_parent(&mut command);
    command
}

/// Runs `program` with `args` within the timeout; how it exited and what it printed, whatever
/// the exit status (for programs whose status is an answer: e2fsck's 1 is "errors corrected").
pub async fn run_for_status<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
) -> Result<std::process::Output> {
    tokio::time::timeout(TIMEOUT, command(program, args).output())
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
pub fn spawn_piped<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<tokio::process::Child> {
    command(program, args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn { program: program.into(), source })
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

    #[tokio::test]
    async fn a_failing_program_reports_its_stderr() {
        let e = run("sh", &["-c", "echo broken >&2; exit 3"]).await.expect_err("fails");
        assert!(matches!(&e, Error::Command { stderr, .. } if stderr == "broken"), "{e}");
    }
}
