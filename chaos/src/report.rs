//! The chaos report: what was done when, what each nemesis cost, and the checker's verdict; as
//! JSON (for tools) and a Markdown table (for people).

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::checker::{RegistryCheck, TelemetryCheck};

/// One nemesis and what it cost.
#[derive(Debug, Clone, Serialize)]
pub struct NemesisResult {
    /// What was done (`kill -9`, `SIGSTOP`, `isolate`).
    pub nemesis: String,
    /// Target node.
    pub node: u64,
    /// Why that node (for example "leads 3 partitions").
    pub why: String,
    /// Trigger → every partition took an append again, in ms.
    pub telemetry_recovery_ms: Option<u64>,
    /// Trigger → first registry write answered 200 on the majority, in ms.
    pub registry_recovery_ms: Option<u64>,
    /// Observations (for example "minority PUBACK: none").
    pub notes: Vec<String>,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Nodes.
    pub nodes: usize,
    /// Telemetry devices (Rust load generator).
    pub devices: usize,
    /// Devices run by the official Python SDK.
    pub sdk_devices: usize,
    /// Partitions and their replication factor.
    pub partitions: u32,
    /// Replicas per partition.
    pub replication_factor: usize,
    /// Whether nodes ran in network namespaces.
    pub netns: bool,
    /// Wall time of the run in seconds.
    pub duration_secs: f64,
    /// (ms since start, event).
    pub timeline: Vec<(u64, String)>,
    /// The nemeses in order.
    pub nemeses: Vec<NemesisResult>,
    /// Telemetry verdict.
    pub telemetry: TelemetryCheck,
    /// Registry verdict.
    pub registry: RegistryCheck,
    /// Checks that failed (empty when the run passed).
    pub failures: Vec<String>,
    /// Whether every check passed.
    pub passed: bool,
}

/// Collects the timeline while a scenario runs.
pub struct Timeline {
    start: Instant,
    events: Vec<(u64, String)>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            events: Vec::new(),
        }
    }
}

impl Timeline {
    /// Records (and prints) an event.
    pub fn note(&mut self, event: impl Into<String>) {
        let event = event.into();
        let at = self.start.elapsed().as_millis() as u64;
        println!("[{:>7.1} s] {event}", at as f64 / 1000.0);
        self.events.push((at, event));
    }

    /// Seconds since the start.
    pub fn elapsed_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The events so far.
    pub fn events(&self) -> Vec<(u64, String)> {
        self.events.clone()
    }
}

fn ms(v: Option<u64>) -> String {
    v.map_or("–".into(), |v| v.to_string())
}

impl Report {
    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let t = &self.telemetry;
        let r = &self.registry;
        let mut md = format!(
            "# Chaos run: {}\n\n{} nodes{}, {} telemetry devices (Rust load generator) + {} official \
             Python SDK devices, {} partitions × RF {}, {:.0} s. Verdict: **{}**.\n\n",
            self.scenario,
            self.nodes,
            if self.netns {
                " in network namespaces"
            } else {
                " on loopback"
            },
            self.devices,
            self.sdk_devices,
            self.partitions,
            self.replication_factor,
            self.duration_secs,
            if self.passed { "passed" } else { "FAILED" }
        );
        md.push_str("| nemesis | node | why | telemetry recovery (ms) | registry recovery (ms) | notes |\n|---|---|---|---|---|---|\n");
        for n in &self.nemeses {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                n.nemesis,
                n.node,
                n.why,
                ms(n.telemetry_recovery_ms),
                ms(n.registry_recovery_ms),
                n.notes.join("; ")
            ));
        }
        md.push_str(&format!(
            "\n| data | acknowledged | lost | duplicates (same message id) | out of order | replicas identical |\n|---|---|---|---|---|---|\n\
             | telemetry (PUBACKed messages) | {} | {} | {} | {} | {} |\n\
             | registry (creates answered 200) | {} | {} | – | – | – |\n",
            t.acked, t.lost, t.duplicates, t.out_of_order_devices, t.replicas_identical, r.acked, r.lost
        ));
        if !self.failures.is_empty() {
            md.push_str("\nFailures:\n");
            for f in &self.failures {
                md.push_str(&format!("- {f}\n"));
            }
        }
        md.push_str("\nTimeline:\n\n");
        for (at, e) in &self.timeline {
            md.push_str(&format!("- {:.1} s: {e}\n", *at as f64 / 1000.0));
        }
        md
    }

    /// Writes `{scenario}.json` and `{scenario}.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join(format!("{}.json", self.scenario)),
            serde_json::to_vec_pretty(self)?,
        )?;
        std::fs::write(dir.join(format!("{}.md", self.scenario)), self.markdown())?;
        Ok(())
    }
}
