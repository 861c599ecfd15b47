//! Server processes: starting them with a guard that kills them on every
//! exit path, and reading what they cost from `/proc` (CPU time from
//! `/proc/<pid>/stat`, peak and current RSS from `/proc/<pid>/status`).

use std::{
    fs,
    io::{self, BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{OnceLock, mpsc},
    thread,
    time::Duration,
};

use anyhow::Context as _;

/// Clock ticks per second for `/proc/<pid>/stat` times (`getconf CLK_TCK`, else 100).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// The fields of `/proc/<pid>/stat` after the command name, which may contain spaces.
fn stat_fields(pid: u32) -> io::Result<Vec<u64>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat has no ')'")))?;
    // Field 3 (state) is a letter; keep positions by mapping it to 0.
    Ok(rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// Index in [`stat_fields`] of `/proc/<pid>/stat` field `n` (1-based, as in proc(5)).
const fn field(n: usize) -> usize {
    n - 3
}

/// A process's own user + system CPU seconds, plus those of its waited-for children.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let f = stat_fields(pid)?;
    let ticks: u64 = [14, 15, 16, 17].iter().map(|&n| f.get(field(n)).copied().unwrap_or(0)).sum();
    Ok(ticks as f64 / clock_ticks())
}

/// CPU seconds of `pid` and every live descendant.
pub fn tree_cpu_seconds(pid: u32) -> io::Result<f64> {
    let mut total = cpu_seconds(pid)?;
    for child in descendants(pid) {
        total += cpu_seconds(child).unwrap_or(0.0);
    }
    Ok(total)
}

/// This process's CPU seconds (the load generator's own cost).
pub fn self_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// CPU seconds the whole machine spent busy (all CPUs: user, nice, system,
/// irq, softirq, steal from the first line of `/proc/stat`).
pub fn machine_busy_seconds() -> f64 {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else { return 0.0 };
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().map(|&i| v.get(i).copied().unwrap_or(0)).sum();
    busy as f64 / clock_ticks()
}

/// Every live descendant of `pid`, from the parent links in `/proc/*/stat`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    let parents: Vec<(u32, u32)> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, *stat_fields(p).ok()?.get(field(4))? as u32)))
        .collect();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &parents {
            if pp == parent && !found.contains(&p) {
                found.push(p);
                frontier.push(p);
            }
        }
    }
    found
}

/// A `Vm*:` line of `/proc/<pid>/status`, in KiB.
fn status_kib(pid: u32, key: &str) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/status has no {key}")))
}

/// Peak resident set (VmHWM) of `pid` and its live descendants, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::iter::once(pid).chain(descendants(pid)).map(|p| status_kib(p, "VmHWM:").unwrap_or(0)).sum()
}

/// Current resident set (VmRSS) of `pid` and its live descendants, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::iter::once(pid).chain(descendants(pid)).map(|p| status_kib(p, "VmRSS:").unwrap_or(0)).sum()
}

/// A loopback address whose port was free a moment ago. Only for servers that
/// cannot report the port they bound; a start that fails on it is retried.
pub fn free_loopback() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?)
}

/// A started server process, killed (with its descendants) when dropped: on
/// success, on error and while a panic unwinds.
pub struct Spawned {
    /// A short name for messages.
    pub name: String,
    child: Child,
    log: PathBuf,
    lines: Option<mpsc::Receiver<String>>,
}

impl Spawned {
    /// Starts `program` with `args` and `env` added to a cleaned environment
    /// (no `FLOTILLA_*`, `FLYTE*` or `RUST_LOG`). Output goes to `log`, or, with
    /// `capture_stdout`, stdout is read line by line ([`Spawned::next_line`]).
    ///
    /// # Errors
    /// When the program cannot be started.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        cwd: Option<&Path>,
        log: PathBuf,
        capture_stdout: bool,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null());
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("FLOTILLA_") || k.starts_with("FLYTE") || k == "RUST_LOG" {
                cmd.env_remove(&*k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = cwd {
            cmd.current_dir(dir);
        }
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stderr(out.try_clone()?);
        cmd.stdout(if capture_stdout { Stdio::piped() } else { out.into() });
        let mut child = cmd.spawn().with_context(|| format!("starting {name} ({})", program.display()))?;
        let lines = child.stdout.take().map(|stdout| {
            let (tx, rx) = mpsc::channel();
            // Drains stdout for the child's whole life; ends when the pipe closes.
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        });
        Ok(Self { name: name.to_owned(), child, log, lines })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The next captured stdout line, if one arrives within `wait`.
    pub fn next_line(&self, wait: Duration) -> Option<String> {
        self.lines.as_ref()?.recv_timeout(wait).ok()
    }

    /// The last lines of the process's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // Descendants first: once the parent is gone they are re-parented and harder to find.
        for pid in descendants(self.child.id()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_ok());
        assert!(machine_busy_seconds() > 0.0);
        assert!(peak_rss_kib(me) > 0);
        assert!(rss_kib(me) <= peak_rss_kib(me));
    }

    #[test]
    fn spawned_child_is_killed_on_drop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sleeper = Spawned::start(
            "sleep",
            Path::new("sleep"),
            &["30".to_owned()],
            &[],
            None,
            dir.path().join("sleep.log"),
            false,
        )
        .expect("sleep starts");
        let pid = sleeper.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(sleeper);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} survived the guard");
    }
}
