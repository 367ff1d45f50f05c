//! `process_*` metrics (the names Prometheus' client libraries use), read
//! from `/proc/self` at each scrape: CPU seconds, resident memory, open file
//! descriptors and their limit, start time. Nothing runs between scrapes.
//! On a system without `/proc` the families are left out.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::time::{SystemTime, UNIX_EPOCH};

/// Clock ticks per second of `/proc/self/stat`'s CPU times: `USER_HZ`, 100
/// on every Linux architecture the lab runs on.
const USER_HZ: f64 = 100.0;

/// The process collector; register it once per registry.
#[derive(Debug)]
pub struct ProcessCollector {
    start: f64,
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessCollector {
    /// Takes now as the process's start time (make it early in `main`).
    pub fn new() -> Self {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Self { start }
    }
}

/// User + system CPU seconds from the text of `/proc/self/stat`.
fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces: count from after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // Fields 14 and 15 (utime, stime); `rest` starts at field 3.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// A `Name:   value kB` line of `/proc/self/status`, in bytes.
fn status_kib(status: &str, name: &str) -> Option<i64> {
    let line = status.lines().find(|l| l.starts_with(name))?;
    let kib: i64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// The soft limit of `Max open files` in `/proc/self/limits`.
fn max_fds(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(cpu) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| cpu_seconds(&s))
        {
            let c = ConstCounter::new(cpu);
            c.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds.",
                None,
                c.metric_type(),
            )?)?;
        }
        if let Some(rss) = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| status_kib(&s, "VmRSS:"))
        {
            let g = ConstGauge::new(rss);
            g.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let g = ConstGauge::new(dir.count() as i64);
            g.encode(encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors.",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(max) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| max_fds(&s))
        {
            let g = ConstGauge::new(max);
            g.encode(encoder.encode_descriptor(
                "process_max_fds",
                "The soft limit of open file descriptors.",
                None,
                g.metric_type(),
            )?)?;
        }
        let g = ConstGauge::new(self.start);
        g.encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds.",
            None,
            g.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_texts() {
        let stat =
            "4242 (lab server) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 130 0 0 20 0 8 0 1 2 3";
        assert_eq!(cpu_seconds(stat), Some(3.8));
        let status = "Name:\tlab-server\nVmRSS:\t   12345 kB\nThreads:\t8\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(12345 * 1024));
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        assert_eq!(max_fds(limits), Some(1024));
    }
}
