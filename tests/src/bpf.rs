//! bpffs and BPF maps from the outside, for tests of what the kernel does while the agent is
//! not there to ask: a bpffs mount of the test's own ([`BpfFs`]), and the pinned maps and
//! links read and written with `bpftool` ([`map_dump`], [`map_update`], [`link_show`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::libc;
use serde_json::Value;
use tempfile::TempDir;

use crate::tools::{require, run_bounded};

/// Bounds one `bpftool` run (they take milliseconds).
const BPFTOOL_LIMIT: Duration = Duration::from_secs(10);

/// A bpffs mounted on a fresh temporary directory in this process's mount namespace,
/// unmounted and removed on drop (also when a test panics), with everything pinned in it:
/// pinned links detach then, unless something else holds them.
///
/// Why not /sys/fs/bpf: `ip netns exec` gives the program it runs a mount namespace of its
/// own with a fresh /sys, so what an agent started that way pins under /sys/fs/bpf is gone with
/// it; other mounts stay visible to it. And a directory of its own keeps concurrent tests from
/// adopting each other's pins.
pub struct BpfFs {
    dir: TempDir,
}

impl BpfFs {
    pub fn mount() -> anyhow::Result<BpfFs> {
        let dir = tempfile::Builder::new()
            .prefix("rampart-bpffs-")
            .tempdir()
            .context("a directory to mount bpffs on")?;
        let target = c_path(dir.path())?;
        // SAFETY: valid NUL-terminated strings; bpffs takes no data.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mount -t bpf bpf {}", dir.path().display()));
        }
        Ok(BpfFs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let Ok(target) = c_path(self.dir.path()) else {
            return;
        };
        // SAFETY: a valid NUL-terminated path.
        let mut rc = unsafe { libc::umount2(target.as_ptr(), 0) };
        if rc != 0 {
            // Busy (a process has its working directory in it, say): detach it now, the
            // kernel frees it when the last user goes.
            // SAFETY: as above.
            rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        if rc != 0 {
            eprintln!(
                "warning: could not unmount the test's bpffs at {}: {}",
                self.dir.path().display(),
                std::io::Error::last_os_error()
            );
        }
        // The TempDir removes the (now empty) directory.
    }
}

fn c_path(path: &Path) -> anyhow::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    Ok(std::ffi::CString::new(path.as_os_str().as_bytes())?)
}

/// One entry of a map as `bpftool` dumps it: the key's bytes and the value's, one value per
/// possible CPU for a per-CPU map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub key: Vec<u8>,
    pub values: Vec<Vec<u8>>,
}

impl MapEntry {
    /// The value of a map that is not per-CPU.
    pub fn value(&self) -> &[u8] {
        assert_eq!(
            self.values.len(),
            1,
            "a per-CPU entry has one value per CPU"
        );
        &self.values[0]
    }

    /// The native-endian u64 at `offset` of the value, summed over CPUs (wrapping, as the
    /// agent sums per-CPU counters).
    pub fn sum_u64(&self, offset: usize) -> u64 {
        self.values
            .iter()
            .map(|v| read_u64(v, offset))
            .fold(0, u64::wrapping_add)
    }
}

/// The native-endian u64 at `offset` of `bytes`.
pub fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let field: [u8; 8] = bytes[offset..offset + 8]
        .try_into()
        .expect("an 8-byte slice");
    u64::from_ne_bytes(field)
}

/// The native-endian u32 at `offset` of `bytes`.
pub fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    let field: [u8; 4] = bytes[offset..offset + 4]
        .try_into()
        .expect("a 4-byte slice");
    u32::from_ne_bytes(field)
}

/// `bpftool`, which `cargo xtask setup` installs: its absence fails the test.
fn bpftool() -> PathBuf {
    require("bpftool", "bpftool (the Debian package)")
}

/// Runs `bpftool -j <args>` and parses what it prints.
fn bpftool_json(args: &[&str]) -> anyhow::Result<Value> {
    let done = run_bounded(Command::new(bpftool()).arg("-j").args(args), BPFTOOL_LIMIT)?;
    if !done.status.success() {
        bail!("`bpftool -j {}` failed:\n{}", args.join(" "), done.output());
    }
    serde_json::from_str(&done.stdout)
        .with_context(|| format!("`bpftool -j {}` printed: {}", args.join(" "), done.stdout))
}

/// Every entry of the map pinned at `path` (`bpftool -j map dump pinned <path>`).
pub fn map_dump(path: &Path) -> anyhow::Result<Vec<MapEntry>> {
    let path_str = path.to_str().context("a UTF-8 pin path")?;
    let dump = bpftool_json(&["map", "dump", "pinned", path_str])?;
    let entries = dump
        .as_array()
        .with_context(|| format!("a map dump is a JSON array: {dump}"))?;
    entries
        .iter()
        .map(|entry| {
            let key = hex_bytes(&entry["key"])
                .with_context(|| format!("the key of {entry} in {path_str}"))?;
            let values = if let Some(per_cpu) = entry["values"].as_array() {
                per_cpu
                    .iter()
                    .map(|cpu| hex_bytes(&cpu["value"]))
                    .collect::<anyhow::Result<_>>()
            } else {
                hex_bytes(&entry["value"]).map(|v| vec![v])
            }
            .with_context(|| format!("the value of {entry} in {path_str}"))?;
            Ok(MapEntry { key, values })
        })
        .collect()
}

/// Writes `value` under `key` in the map pinned at `path` (`bpftool map update pinned <path>
/// key hex .. value hex ..`): created or replaced.
pub fn map_update(path: &Path, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
    let hex = |bytes: &[u8]| -> Vec<String> { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    let mut command = Command::new(bpftool());
    command
        .args(["map", "update", "pinned"])
        .arg(path)
        .args(["key", "hex"])
        .args(hex(key))
        .args(["value", "hex"])
        .args(hex(value));
    let done = run_bounded(&mut command, BPFTOOL_LIMIT)?;
    if !done.status.success() {
        bail!(
            "`bpftool map update pinned {}` failed:\n{}",
            path.display(),
            done.output()
        );
    }
    Ok(())
}

/// The BPF link pinned at `path` (`bpftool -j link show pinned <path>`): `id`, `prog_id`,
/// `type`, `ifindex`, ...
pub fn link_show(path: &Path) -> anyhow::Result<Value> {
    let path_str = path.to_str().context("a UTF-8 pin path")?;
    bpftool_json(&["link", "show", "pinned", path_str])
}

/// `["0x01", "0xff", ...]` -> bytes.
fn hex_bytes(v: &Value) -> anyhow::Result<Vec<u8>> {
    v.as_array()
        .context("not an array of bytes")?
        .iter()
        .map(|b| {
            let text = b.as_str().context("not a hex string")?;
            let digits = text.strip_prefix("0x").unwrap_or(text);
            u8::from_str_radix(digits, 16).with_context(|| format!("not a hex byte: {text}"))
        })
        .collect()
}
