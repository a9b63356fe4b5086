//! What the bench reads from `/proc`: a server's resident memory and CPU
//! time, the pid listening on a port, and the machine notes for RESULTS.md.

use std::fs;

use anyhow::{bail, Context};
use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`;
/// 100 on every Linux the bench targets).
const CLK_TCK: f64 = 100.0;

/// Resident set size in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// User + system CPU seconds the process has used so far.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    cpu_secs_of_stat(&stat)
}

/// User + system CPU seconds from the text of a `/proc/<pid>/stat`.
fn cpu_secs_of_stat(stat: &str) -> anyhow::Result<f64> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; `rest` starts at field 3.
    let tick = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i - 3)
            .context("short /proc/<pid>/stat")?
            .parse::<f64>()?)
    };
    Ok((tick(14)? + tick(15)?) / CLK_TCK)
}

/// Busy and total CPU seconds of the whole machine so far, summed over its
/// cores (first line of `/proc/stat`; busy is all but idle and iowait; the
/// tick is `CLK_TCK` here too).
pub fn machine_cpu_secs() -> anyhow::Result<(f64, f64)> {
    machine_cpu_of_stat(&fs::read_to_string("/proc/stat").context("read /proc/stat")?)
}

fn machine_cpu_of_stat(stat: &str) -> anyhow::Result<(f64, f64)> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse::<f64>())
        .collect::<Result<_, _>>()?;
    let total: f64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    Ok(((total - idle) / CLK_TCK, total / CLK_TCK))
}

/// Kernel memory of the whole machine that sockets grow: slab (socket,
/// inode, dentry, epoll objects; `Slab:` of `/proc/meminfo`) and TCP buffer
/// pages (`mem` of the `TCP:` line of `/proc/net/sockstat`), both in KiB.
pub fn kernel_kib() -> anyhow::Result<(u64, u64)> {
    let meminfo = fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    let sockstat = fs::read_to_string("/proc/net/sockstat").context("read /proc/net/sockstat")?;
    kernel_kib_of(&meminfo, &sockstat)
}

fn kernel_kib_of(meminfo: &str, sockstat: &str) -> anyhow::Result<(u64, u64)> {
    let slab = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .context("no Slab in /proc/meminfo")?;
    // "TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 1": pairs after the name.
    let tcp_pages = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.chunks(2)
                .find(|kv| kv[0] == "mem")
                .and_then(|kv| kv.get(1)?.parse::<u64>().ok())
        })
        .context("no TCP mem in /proc/net/sockstat")?;
    Ok((slab, tcp_pages * 4))
}

/// Open file descriptors of a process, and how many of them are sockets.
pub fn open_fds(pid: u32) -> anyhow::Result<(u64, u64)> {
    let mut fds = 0;
    let mut sockets = 0;
    for fd in fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        fds += 1;
        if fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
            sockets += 1;
        }
    }
    Ok((fds, sockets))
}

/// This process's soft `RLIMIT_NOFILE` (`ulimit -n`), if finite.
pub fn open_files_soft_limit() -> Option<u64> {
    fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The pid of the process with a socket listening on 127.0.0.1/0.0.0.0:`port`.
pub fn pid_listening_on(port: u16) -> anyhow::Result<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT; state 0A is LISTEN; inode is field 9.
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && local_port == Some(port) {
                inodes.push(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        bail!("nothing listens on port {port}");
    }
    for entry in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    return Ok(pid);
                }
            }
        }
    }
    bail!("port {port} is listened on, but by no process this user can see")
}

/// Where the figures come from.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub open_files_limit: String,
    pub kernel: String,
    pub memory_gib: f64,
    pub cpu_model: String,
    pub ip_local_port_range: String,
}

pub fn machine() -> Machine {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let limits = read("/proc/self/limits");
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!(
                "soft {} / hard {}",
                f.get(3).unwrap_or(&"?"),
                f.get(4).unwrap_or(&"?")
            )
        })
        .unwrap_or_default();
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        open_files_limit: nofile,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        memory_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        cpu_model: read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default(),
        ip_local_port_range: read("/proc/sys/net/ipv4/ip_local_port_range")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("-"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_kib(pid).unwrap() > 0);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(pid_listening_on(port).unwrap(), pid);
        let (fds, sockets) = open_fds(pid).unwrap();
        assert!(fds >= sockets && sockets >= 1);
        assert!(open_files_soft_limit().unwrap() > 0);
    }

    #[test]
    fn machine_cpu_is_all_but_idle_and_iowait() {
        let stat = "cpu  100 10 50 800 40 0 0 0 0 0\ncpu0 50 5 25 400 20 0 0 0 0 0\n";
        let (busy, total) = machine_cpu_of_stat(stat).unwrap();
        assert!((busy - 1.6).abs() < 1e-9, "{busy}");
        assert!((total - 10.0).abs() < 1e-9, "{total}");
        assert!(machine_cpu_secs().is_ok());
    }

    #[test]
    fn kernel_memory_is_slab_and_tcp_pages() {
        let meminfo = "MemTotal: 100 kB\nSlab:             123456 kB\nSReclaimable: 5 kB\n";
        let sockstat =
            "sockets: used 9\nTCP: inuse 5 orphan 0 tw 2 alloc 7 mem 300\nUDP: inuse 1 mem 8\n";
        assert_eq!(kernel_kib_of(meminfo, sockstat).unwrap(), (123456, 1200));
        assert!(kernel_kib_of("MemTotal: 1 kB\n", sockstat).is_err());
        assert!(kernel_kib().is_ok());
    }

    #[test]
    fn cpu_seconds_are_utime_plus_stime() {
        // pid, comm (parentheses and spaces in it), state, then fields 4..;
        // utime (14) = 250 ticks, stime (15) = 50, cutime/cstime = 7/9.
        let stat = "42 (my (odd) cmd) R 1 42 42 0 -1 4194560 100 0 0 0 250 50 7 9 20 0 1 0 5";
        assert_eq!(cpu_secs_of_stat(stat).unwrap(), 3.0);
        assert!(cpu_secs_of_stat("42 (x) R 1 2").is_err(), "short stat");
    }

    #[test]
    fn cpu_seconds_grow_with_work() {
        let pid = std::process::id();
        let before = cpu_secs(pid).unwrap();
        // Busy until the kernel has charged 0.2 s more (ticks are 10 ms);
        // the wall-clock bound only stops a broken reading from hanging.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_secs(pid).unwrap() < before + 0.2 {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
            assert!(
                started.elapsed() < std::time::Duration::from_secs(60),
                "CPU time stuck at {before}"
            );
        }
    }
}
