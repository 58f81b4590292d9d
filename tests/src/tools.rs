//! External programs the interop tests drive: looked up on PATH, run with a time limit.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// `name` on PATH, or a panic that says how to install it: a missing interop tool must fail
/// the test (CI installs them through `cargo xtask setup`), never skip it silently.
pub fn require(name: &str, installed_by: &str) -> PathBuf {
    find_on_path(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is not installed (not found on PATH): `cargo xtask setup` installs {installed_by} \
             (CI installs it through xtask)"
        )
    })
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The child gets SIGKILL when the thread that spawned it ends, so a test process killed
/// by a runner's timeout (or Ctrl-C) leaves no server or peer behind. Every harness child
/// is owned by the test thread that started it and dropped before that thread ends.
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches nothing of the parent's state.
    unsafe {
        command.pre_exec(|| {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// What a finished program printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Both streams, for assertions and failure messages.
    pub fn output(&self) -> String {
        format!(
            "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Run `command` to completion, killing it after `limit`: the tools we drive wait forever
/// for an answer that never comes (e.g. `turnutils_stunclient` has no timeout).
pub fn run_bounded(command: &mut Command, limit: Duration) -> anyhow::Result<Finished> {
    let mut child = die_with_parent(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {command:?}"))?;
    // Drain both pipes on threads so a chatty program never blocks on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let status = match status {
        Some(status) => status,
        None => {
            kill(&mut child);
            let out = join(stdout);
            let err = join(stderr);
            bail!(
                "{command:?} did not finish within {limit:?}; killed.\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
            );
        }
    };
    Ok(Finished {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

/// A background program (an echo peer) killed on drop.
pub struct Background {
    pub child: Child,
    name: String,
}

impl Background {
    pub fn spawn(command: &mut Command) -> anyhow::Result<Self> {
        let child = die_with_parent(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?;
        Ok(Background {
            child,
            name: format!("{:?}", command.get_program()),
        })
    }

    /// Fails if the program has already exited (e.g. it could not bind its port).
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early with {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

type Drain = std::thread::JoinHandle<String>;

fn drain(pipe: Option<impl Read + Send + 'static>) -> Option<Drain> {
    pipe.map(|mut pipe| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    })
}

fn join(handle: Option<Drain>) -> String {
    handle.and_then(|h| h.join().ok()).unwrap_or_default()
}
