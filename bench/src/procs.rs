//! Child processes (the real release binaries) and what the bench reads about processes:
//! free ports, readiness, resident memory, CPU time, the open-files limit.
use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A running child; killed (SIGKILL) when dropped if [`Proc::stop`] was not called.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `bin` with exactly `envs` added to a cleared environment (plus PATH/HOME),
    /// its output appended to `log`, dying with the bench (PR_SET_PDEATHSIG).
    pub fn spawn(
        name: &str,
        bin: &Path,
        envs: &[(String, String)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.env_clear()
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        for key in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Errors if the child has exited (with the tail of its log).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!(
                "{} exited ({status}); log tail:\n{}",
                self.name,
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A loopback port free right now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe port")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `url` until it answers 200, the process dies, or `limit` passes.
pub async fn wait_ready(
    http: &reqwest::Client,
    proc_: &mut Proc,
    url: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        proc_.check_alive()?;
        if let Ok(resp) = http.get(url).send().await
            && resp.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{} not ready at {url} after {limit:?}; log tail:\n{}",
        proc_.name,
        log_tail(&proc_.log)
    )
}

/// Resident memory of a process in KiB (VmRSS), 0 if unreadable.
pub fn rss_kib(pid: u32) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU time of a process so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command (which may hold spaces) start after the last ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime field 15.
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

/// (busy, total) ticks of the whole machine from /proc/stat.
pub fn machine_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Raises this process's open-files limit (children inherit it) as far as allowed; returns
/// the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        let raised = libc::rlimit {
            rlim_cur: want.max(lim.rlim_cur),
            rlim_max: want.max(lim.rlim_max),
        };
        // Raising the hard limit needs CAP_SYS_RESOURCE; fall back to the current hard one.
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// CPU use of a set of processes and of the machine over an interval.
pub struct CpuMeter {
    start: Instant,
    procs: Vec<(String, u32, u64)>,
    own: u64,
    groups: Vec<(String, u64)>,
    machine: (u64, u64),
}

/// Process names whose CPU is summed (every process of that name on the machine, which may
/// include other users' servers and tests).
const GROUPS: [&str; 2] = ["postgres", "redis-server"];

/// CPU ticks of every live process named `comm`.
pub fn group_ticks(comm: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut sum = 0;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if c.trim_end() == comm {
            sum += cpu_ticks(pid);
        }
    }
    sum
}

impl CpuMeter {
    pub fn start(procs: &[(&str, u32)]) -> Self {
        CpuMeter {
            start: Instant::now(),
            procs: procs
                .iter()
                .map(|(n, p)| ((*n).to_owned(), *p, cpu_ticks(*p)))
                .collect(),
            own: cpu_ticks(std::process::id()),
            groups: GROUPS
                .iter()
                .map(|g| ((*g).to_owned(), group_ticks(g)))
                .collect(),
            machine: machine_ticks(),
        }
    }

    /// Percent of one core used by the bench and each process, and percent of the whole
    /// machine busy (every process, ours or not).
    pub fn finish(&self) -> Vec<(String, f64)> {
        self.spent().percentages()
    }

    /// CPU spent since the start: by the bench, each process and each group, and by the
    /// whole machine.
    pub fn spent(&self) -> CpuSpent {
        let hz = clock_ticks_per_sec();
        let secs = |ticks: u64| ticks as f64 / hz;
        let mut by_name = vec![(
            "bench".to_owned(),
            secs(cpu_ticks(std::process::id()).saturating_sub(self.own)),
        )];
        for (name, pid, t0) in &self.procs {
            by_name.push((name.clone(), secs(cpu_ticks(*pid).saturating_sub(*t0))));
        }
        for (group, t0) in &self.groups {
            by_name.push((group.clone(), secs(group_ticks(group).saturating_sub(*t0))));
        }
        let (busy, total) = machine_ticks();
        CpuSpent {
            wall_secs: self.start.elapsed().as_secs_f64().max(1e-3),
            by_name,
            machine_busy_secs: secs(busy.saturating_sub(self.machine.0)),
            machine_total_secs: secs(total.saturating_sub(self.machine.1)),
        }
    }
}

/// CPU time spent over an interval.
#[derive(Debug, Clone, Default)]
pub struct CpuSpent {
    /// Length of the interval.
    pub wall_secs: f64,
    /// CPU seconds (user + system) of the bench, each process and each group, in that order.
    pub by_name: Vec<(String, f64)>,
    /// CPU seconds the whole machine was busy (every process, ours or not; all cores).
    pub machine_busy_secs: f64,
    /// CPU seconds the machine had (the interval × its cores).
    pub machine_total_secs: f64,
}

impl CpuSpent {
    /// CPU seconds of `name` (a process or group), 0 if not measured.
    pub fn secs(&self, name: &str) -> f64 {
        self.by_name
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| *s)
            .unwrap_or(0.0)
    }

    /// Percent of one core used by the bench, each process and each group, then
    /// `machine_busy`, the percent of the whole machine busy ([`CpuMeter::finish`]).
    pub fn percentages(&self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .by_name
            .iter()
            .map(|(n, s)| (n.clone(), s / self.wall_secs * 100.0))
            .collect();
        out.push((
            "machine_busy".to_owned(),
            self.machine_busy_secs / self.machine_total_secs.max(1e-9) * 100.0,
        ));
        out
    }
}
