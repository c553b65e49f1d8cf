//! The standard Prometheus process metrics, read from `/proc/self` (Linux;
//! elsewhere they are left out), and `tally_build_info`.

use std::fmt::Write as _;
use std::sync::OnceLock;

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`: 100 on
/// every Linux architecture).
const USER_HZ: f64 = 100.0;

static COMMIT: OnceLock<String> = OnceLock::new();

/// The commit the binary was built from (the `tally` binary sets it from
/// `TALLY_GIT_COMMIT` at build time; `unknown` otherwise).
pub fn set_build_commit(commit: &str) {
    let _ = COMMIT.set(commit.to_string());
}

/// What the process metrics are made of.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Process {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub threads: u64,
    pub start_time_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// Fields of `/proc/self/stat` after the command name: (utime, stime,
/// num_threads, starttime, vsize, rss pages).
fn parse_stat(stat: &str) -> Option<(u64, u64, u64, u64, u64, u64)> {
    // The command name may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some((n(14)?, n(15)?, n(20)?, n(22)?, n(23)?, n(24)?))
}

fn read() -> Option<Process> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (utime, stime, threads, start_ticks, vsize, rss_pages) = parse_stat(&stat)?;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // VmRSS in kB (no page size needed); the stat field as a fallback.
    let resident = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(rss_pages * 4096, |kb| kb * 1024);
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        });
    Some(Process {
        cpu_seconds: (utime + stime) as f64 / USER_HZ,
        resident_bytes: resident,
        virtual_bytes: vsize,
        threads,
        start_time_seconds: boot.map(|b| b + start_ticks as f64 / USER_HZ),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64),
        max_fds,
    })
}

/// `tally_build_info` and the `process_*` metrics.
pub(super) fn render(o: &mut String) {
    let commit = COMMIT.get().map_or("unknown", String::as_str);
    let _ = writeln!(
        o,
        "# HELP tally_build_info The version and commit of this binary (always 1).\n# TYPE tally_build_info gauge\ntally_build_info{{version=\"{}\",commit=\"{commit}\"}} 1",
        env!("CARGO_PKG_VERSION"),
    );
    let Some(p) = read() else {
        return;
    };
    let mut metric = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    metric(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        p.cpu_seconds,
    );
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        p.resident_bytes as f64,
    );
    metric(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        p.virtual_bytes as f64,
    );
    metric(
        "process_threads",
        "gauge",
        "Number of OS threads in the process.",
        p.threads as f64,
    );
    if let Some(v) = p.start_time_seconds {
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            v,
        );
    }
    if let Some(v) = p.open_fds {
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            v as f64,
        );
    }
    if let Some(v) = p.max_fds {
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            v as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        // A command name with a space and a parenthesis.
        let stat = "4242 (tally (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 17 0 123456 987654321 2048 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some((250, 75, 17, 123456, 987654321, 2048))
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_measured() {
        let p = read().unwrap_or_default();
        assert!(p.resident_bytes > 1 << 20, "{p:?}");
        assert!(p.threads >= 1 && p.open_fds.unwrap_or(0) >= 3, "{p:?}");
        let now = chrono::Utc::now().timestamp() as f64;
        let started = p.start_time_seconds.unwrap_or(0.0);
        assert!(started > now - 86_400.0 && started <= now + 1.0, "{p:?}");
        let mut o = String::new();
        render(&mut o);
        assert!(o.contains("tally_build_info{version=\""));
        assert!(o.contains("\nprocess_cpu_seconds_total "));
    }
}
