//! Headless Chromium driven over the DevTools protocol (CDP), for tests that need a real
//! browser's WebRTC stack (`tests/tests/chromium_call.rs`).
//!
//! With `--remote-debugging-pipe` the browser reads requests from fd 3 and writes answers and
//! events to fd 4, each one JSON text ended by a NUL: no port to find inside a namespace, no
//! HTTP or websocket client, and end of file on fd 4 says at once that the browser is gone. A
//! reader thread splits what comes on fd 4: answers go to the caller waiting for their id, the
//! page's console output and uncaught exceptions are kept for failure messages.
//!
//! The browser runs in a network namespace (`ip netns exec`), in a process group of its own
//! that its zygote and renderers join, with a fresh profile; on drop it is asked to close, then
//! the group is killed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, PipeReader, PipeWriter, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::libc;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tempfile::TempDir;

/// Bounds the first answer, i.e. the browser's start: 0.5 to 1.5 s measured on two idle
/// cores; CI's cores are busy with other tests.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds each protocol call that does not run page code (they answer in milliseconds).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds `Browser.close`, and then the browser's exit, before its group is killed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The page's latest console lines and exceptions kept for a failure message.
const CONSOLE_LINES: usize = 200;
/// Lines of the browser's own output shown with a failure.
const LOG_TAIL_LINES: usize = 60;

/// The browser's command line, besides its profile and first page.
const FLAGS: &[&str] = &[
    "--headless",
    // Tests run as root, and Chromium refuses to run its sandbox as root.
    "--no-sandbox",
    "--disable-gpu",
    // No network reaches Google's services from here: without these the browser keeps trying
    // them, from the first second on.
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
];

/// A running browser with one page of its own, closed and killed on drop.
pub struct Chromium {
    name: String,
    child: Child,
    requests: PipeWriter,
    answers: Receiver<Value>,
    console: Arc<Mutex<VecDeque<String>>>,
    next_id: u64,
    /// The CDP session attached to the page.
    page: String,
    log_path: PathBuf,
    /// The profile; removed once the browser is gone (fields drop after `drop`).
    _profile: TempDir,
}

impl Chromium {
    /// Starts `binary` (Debian's `chromium`) in the network namespace `netns`, opens a page
    /// and grants it camera and microphone. WebRTC needs that grant to use the addresses of
    /// the host's interfaces: without it Chromium offers only the address it would use for
    /// 8.8.8.8, and in a namespace with no default route that is no address at all, so an
    /// answer without an ICE server had no candidate (seen with Chromium 156).
    ///
    /// `name` tells the browsers apart in messages. Call it on the thread that keeps the
    /// browser: the browser dies with that thread (`die_with_parent`), so not inside
    /// `netns::run_in`, whose thread ends at once.
    pub fn start(binary: &Path, netns: &str, name: &str) -> anyhow::Result<Chromium> {
        let profile = tempfile::Builder::new()
            .prefix("rampart-chromium-")
            .tempdir()?;
        let log_path = profile.path().join("chromium.log");
        let log = File::create(&log_path)?;
        let (requests_end, requests) = std::io::pipe()?;
        let (answers_pipe, answers_end) = std::io::pipe()?;
        let ends = (requests_end.as_raw_fd(), answers_end.as_raw_fd());
        let console = Arc::new(Mutex::new(VecDeque::new()));
        let (sender, answers) = mpsc::channel();
        let kept = Arc::clone(&console);
        // Not joined: it ends at end of file, when the browser is gone (or was never started:
        // the write end is dropped on the way out).
        std::thread::Builder::new()
            .name(format!("cdp-{name}"))
            .spawn(move || read_messages(answers_pipe, &sender, &kept))?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(binary)
            .args(FLAGS)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank");
        // `ip netns exec` and Debian's launcher script both exec in place: the child is the
        // browser, and the leader of the group.
        crate::tools::die_with_parent(&mut command)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // SAFETY: only fcntl and dup2, which are async-signal-safe, on descriptors this
        // process owns.
        unsafe {
            command.pre_exec(move || onto_fds_3_and_4(ends));
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning {command:?}"))?;
        // The browser holds the only write end of its answers now, so its exit is end of file.
        drop(requests_end);
        drop(answers_end);
        let mut browser = Chromium {
            name: name.to_owned(),
            child,
            requests,
            answers,
            console,
            next_id: 0,
            page: String::new(),
            log_path,
            _profile: profile,
        };
        browser.open_page()?;
        Ok(browser)
    }

    fn open_page(&mut self) -> anyhow::Result<()> {
        // Before any page exists, so the page's first RTCPeerConnection already has it; with
        // no origin it holds for every origin, about:blank's opaque one included.
        self.call(
            "Browser.grantPermissions",
            json!({ "permissions": ["audioCapture", "videoCapture"] }),
            None,
            STARTUP_TIMEOUT,
        )?;
        // A page of our own rather than the command line's: no race with that one's creation.
        let target = self.call(
            "Target.createTarget",
            json!({ "url": "about:blank" }),
            None,
            CALL_TIMEOUT,
        )?;
        let target = target["targetId"]
            .as_str()
            .context("Target.createTarget answered no targetId")?;
        let attached = self.call(
            "Target.attachToTarget",
            json!({ "targetId": target, "flatten": true }),
            None,
            CALL_TIMEOUT,
        )?;
        self.page = attached["sessionId"]
            .as_str()
            .context("Target.attachToTarget answered no sessionId")?
            .to_owned();
        // From here on the page's console and exceptions come as events.
        let page = self.page.clone();
        self.call("Runtime.enable", json!({}), Some(&page), CALL_TIMEOUT)?;
        Ok(())
    }

    /// One protocol call, on the browser or on a `session`, waiting at most `limit` for its
    /// answer: the answer's `result`, or an error with the protocol's error, or with the
    /// page's console and the browser's output when it did not answer.
    pub fn call(
        &mut self,
        method: &str,
        params: Value,
        session: Option<&str>,
        limit: Duration,
    ) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            request["sessionId"] = session.into();
        }
        let mut bytes = serde_json::to_vec(&request)?;
        bytes.push(0);
        // Requests are a few kilobytes and answered before the next is sent: the pipe's 64 KiB
        // never fill, so this does not wait on the browser.
        self.requests
            .write_all(&bytes)
            .with_context(|| format!("{}: sending {method}{}", self.name, self.report()))?;
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.answers.recv_timeout(left) {
                Ok(answer) if answer["id"] == id => {
                    if let Some(error) = answer.get("error") {
                        bail!("{}: {method} failed: {error}", self.name);
                    }
                    return Ok(answer["result"].clone());
                }
                // The late answer to a call that gave up waiting.
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{}: no answer to {method} within {limit:?}{}",
                    self.name,
                    self.report()
                ),
                Err(RecvTimeoutError::Disconnected) => bail!(
                    "{}: the browser closed its DevTools pipe during {method}{}",
                    self.name,
                    self.report()
                ),
            }
        }
    }

    /// Evaluates `expression` in the page and, if it gives a promise, waits for it, for at
    /// most `limit`: the value as JSON (null for undefined), or an error with what was thrown
    /// and the page's console.
    pub fn evaluate(&mut self, expression: &str, limit: Duration) -> anyhow::Result<Value> {
        let page = self.page.clone();
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "awaitPromise": true, "returnByValue": true }),
            Some(&page),
            limit,
        )?;
        if let Some(details) = result.get("exceptionDetails") {
            bail!(
                "{}: `{}` failed: {}{}",
                self.name,
                abbreviated(expression),
                exception_text(details),
                self.report()
            );
        }
        Ok(result["result"]["value"].clone())
    }

    /// The page's console and the tail of the browser's output, for a failure message.
    pub fn report(&self) -> String {
        let console: Vec<String> = self
            .console
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        let log =
            std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no output: {e})"));
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
        format!(
            "\n----- {name}: page console ({} lines) -----\n{}\n----- {name}: browser output \
             ({}, last {} of {} lines) -----\n{}\n-----",
            console.len(),
            console.join("\n"),
            self.log_path.display(),
            tail.len(),
            lines.len(),
            tail.join("\n"),
            name = self.name,
        )
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The test runner shows this only for a failed test.
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
        let _ = self.call("Browser.close", json!({}), None, CLOSE_TIMEOUT);
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever of the group is left (a hung browser, its zygote and renderers): the group
        // outlives its leader while members remain. The crash handler leaves the group but
        // exits by itself within about two seconds of the browser.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In the child between fork and exec: the pipe ends onto fds 3 and 4, where Chromium looks for
/// them. Each is first copied above 4 (close-on-exec), so that putting one on 3 cannot close
/// the other should it be there; dup2 leaves 3 and 4 open across exec.
fn onto_fds_3_and_4((requests, answers): (RawFd, RawFd)) -> std::io::Result<()> {
    let mut high = [0; 2];
    for (copy, fd) in high.iter_mut().zip([requests, answers]) {
        // SAFETY: fcntl on a descriptor this process owns.
        *copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        if *copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (copy, target) in high.into_iter().zip([3, 4]) {
        // SAFETY: dup2 between descriptors of this process.
        if unsafe { libc::dup2(copy, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The reader thread: NUL-ended JSON texts from the browser until end of file. Answers go to
/// `answers`; the page's console lines and exceptions to `console`. Something that is not
/// JSON ends the protocol: it is kept in `console` and the thread ends, which the waiting call
/// reports.
fn read_messages(pipe: PipeReader, answers: &Sender<Value>, console: &Mutex<VecDeque<String>>) {
    let keep = |line: String| {
        let mut lines = console.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == CONSOLE_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    };
    let mut pipe = BufReader::new(pipe);
    let mut message = Vec::new();
    loop {
        message.clear();
        match pipe.read_until(0, &mut message) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if message.last() == Some(&0) {
            message.pop();
        }
        let value: Value = match serde_json::from_slice(&message) {
            Ok(value) => value,
            Err(e) => {
                keep(format!(
                    "(the browser sent something that is not JSON: {e}: {})",
                    abbreviated(&String::from_utf8_lossy(&message))
                ));
                return;
            }
        };
        if value.get("id").is_some() {
            // The receiver is gone only when the browser's value is being dropped.
            if answers.send(value).is_err() {
                return;
            }
        } else if let Some(line) = console_line(&value) {
            keep(line);
        }
    }
}

/// A console call or an uncaught exception of the page, as a line; None for other events.
fn console_line(event: &Value) -> Option<String> {
    let params = &event["params"];
    match event["method"].as_str()? {
        "Runtime.consoleAPICalled" => {
            let args: Vec<String> = params["args"]
                .as_array()?
                .iter()
                .map(|arg| match &arg["value"] {
                    Value::String(text) => text.clone(),
                    Value::Null => arg["description"].as_str().unwrap_or("?").to_owned(),
                    value => value.to_string(),
                })
                .collect();
            let kind = params["type"].as_str().unwrap_or("log");
            Some(format!("console.{kind}: {}", args.join(" ")))
        }
        "Runtime.exceptionThrown" => Some(format!(
            "uncaught: {}",
            exception_text(&params["exceptionDetails"])
        )),
        _ => None,
    }
}

/// What a page's exception says: the error with its stack, or the protocol's summary.
fn exception_text(details: &Value) -> String {
    details["exception"]["description"]
        .as_str()
        .or_else(|| details["text"].as_str())
        .unwrap_or("(no description)")
        .to_owned()
}

/// The start of a long text (a page's code, an SDP) for a message.
fn abbreviated(text: &str) -> String {
    const SHOWN: usize = 120;
    match text.char_indices().nth(SHOWN) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}
