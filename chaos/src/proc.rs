//! Processes and measurements shared by the benchmark and chaos binaries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

/// `n` distinct free loopback ports (see `meridian::client::free_ports`).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    Ok(meridian::client::free_ports(n)?)
}

/// A child process (a `meridian` node or a peer system) that can be killed and started again;
/// killed when dropped.
pub struct Proc {
    child: Option<Child>,
    cmd: Vec<String>,
    log: PathBuf,
    log_filter: String,
}

impl Proc {
    /// Starts `cmd` (program and arguments) with stdout and stderr appended to `log`.
    pub fn start(cmd: Vec<String>, log: PathBuf) -> Result<Self> {
        Self::start_with_log_filter(cmd, log, "warn")
    }

    /// Like [`Proc::start`], with `MERIDIAN_OBSERVABILITY__LOG_FILTER` set to `filter`.
    pub fn start_with_log_filter(cmd: Vec<String>, log: PathBuf, filter: &str) -> Result<Self> {
        let mut p = Self {
            child: None,
            cmd,
            log,
            log_filter: filter.to_string(),
        };
        p.spawn()?;
        Ok(p)
    }
    /// Starts the process again (after [`Proc::kill9`]).
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .env("MERIDIAN_OBSERVABILITY__LOG_FILTER", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", self.cmd[0]))?;
        self.child = Some(child);
        Ok(())
    }
    /// SIGKILL, no shutdown path.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Proc {
    /// Whether the process was started and not killed.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGSTOP: the process freezes with its sockets open (a "paused" node, like a long GC or a
    /// stalled VM).
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<()> {
        let pid = self.pid().context("process not running")?;
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The `p` quantile (0..=1) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// One value of the Prometheus text at `http://{addr}/metrics` (`name` may include labels).
pub async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    buf.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
