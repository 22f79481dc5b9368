//! A CPU quota for a child process: a cgroup of its own with a CFS bandwidth limit, as a
//! container's CPU limit (Kubernetes `resources.limits.cpu`) sets one. Used by the
//! overload benchmark to make ingest's CPU the limit on a machine whose cores the load
//! generator also needs.
//!
//! cgroup v2 (`cpu.max`) where the unified hierarchy has the cpu controller, else v1's
//! cpu controller (`cpu.cfs_quota_us`). Needs write access to the cgroup filesystem
//! (root, outside a container that mounts it read-only).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The quota's period. Short, so that a throttled process waits at most a few ms (a
/// 100 ms period, the kernel's and Kubernetes' default, stalls a process at 0.25 CPU for
/// 75 ms at a time and would set the latencies by itself); the kernel's minimum quota
/// (1 ms) then sets the smallest fraction, 0.1.
const PERIOD: Duration = Duration::from_millis(10);
const MIN_QUOTA: Duration = Duration::from_millis(1);

/// A cgroup made for one process; removed on drop (once the process has left it).
pub(crate) struct CpuQuota {
    dir: PathBuf,
}

impl CpuQuota {
    /// Moves `pid` (all its threads) into a new cgroup limited to `cpus` CPUs (0.25: a
    /// quarter of one).
    pub(crate) fn apply(pid: u32, cpus: f64) -> anyhow::Result<Self> {
        if !cpus.is_finite() || cpus <= 0.0 || cpus > 1024.0 {
            bail!("a CPU quota must be a number of CPUs above 0 (\"0.5\"), not {cpus}");
        }
        let quota = PERIOD.mul_f64(cpus);
        if quota < MIN_QUOTA {
            bail!(
                "a CPU quota of {cpus} is below the kernel's smallest ({:.1} CPU with a {PERIOD:?} period)",
                MIN_QUOTA.as_secs_f64() / PERIOD.as_secs_f64()
            );
        }
        let (quota_us, period_us) = (quota.as_micros(), PERIOD.as_micros());
        let name = format!("s2s-bench-{pid}");
        let root = Path::new("/sys/fs/cgroup");
        let v2 = std::fs::read_to_string(root.join("cgroup.controllers"))
            .map(|c| c.split_whitespace().any(|c| c == "cpu"))
            .unwrap_or(false);
        let dir = if v2 {
            root.join(&name)
        } else {
            root.join("cpu").join(&name)
        };
        std::fs::create_dir(&dir).with_context(|| {
            format!(
                "making the cgroup {} (a CPU quota needs root and a writable cgroup filesystem)",
                dir.display()
            )
        })?;
        let made = CpuQuota { dir };
        let write = |file: &str, value: String| {
            std::fs::write(made.dir.join(file), &value)
                .with_context(|| format!("writing {value:?} to {}", made.dir.join(file).display()))
        };
        if v2 {
            write("cpu.max", format!("{quota_us} {period_us}"))?;
        } else {
            write("cpu.cfs_period_us", period_us.to_string())?;
            write("cpu.cfs_quota_us", quota_us.to_string())?;
        }
        write("cgroup.procs", pid.to_string())?;
        Ok(made)
    }

    /// Quota periods so far, and in how many the process was held back (`cpu.stat`'s
    /// `nr_periods`, `nr_throttled`, in v1 and v2).
    pub(crate) fn periods(&self) -> (u64, u64) {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let field = |name: &str| {
            stat.lines()
                .filter_map(|l| l.split_once(' '))
                .find(|(k, _)| *k == name)
                .and_then(|(_, v)| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        (field("nr_periods"), field("nr_throttled"))
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // The process was killed by the caller; its exit may take a moment to be seen.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50)); // poll: the killed process leaving
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_the_kernel_cannot_take_are_refused_before_any_cgroup_is_made() {
        for cpus in [0.0, -1.0, f64::NAN, f64::INFINITY, 0.05] {
            let Err(e) = CpuQuota::apply(u32::MAX, cpus) else {
                panic!("a quota of {cpus} was taken");
            };
            let e = e.to_string();
            assert!(
                e.contains("above 0") || e.contains("below the kernel's smallest"),
                "{cpus}: {e}"
            );
        }
    }
}
