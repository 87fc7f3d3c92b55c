//! The agent's own CPU and memory with 32 domains, at idle and at one controller round per second (BENCHMARKS.md,
//! "Agent cost"). Run: `cargo bench --bench agent_cost` (simulated backend), or, on a host with 32 running guests,
//! `VCB_BACKEND=libvirt cargo bench --features libvirt --bench agent_cost`.
//!
//! The agent runs in its own process; the driver samples its `utime + stime` and `VmRSS` from `/proc` once per
//! second, first over an idle window, then over a window in which a controller in this process
//! ([`HostWorker::round`]) runs one round per second against it. With the libvirt backend the driver also samples
//! `libvirtd` over the same windows: the CPU the daemon spends serving the agent is the baseline the agent's own CPU
//! is compared with (the agent should cost no more than the libvirt work it asks for). With libvirt, a third window
//! makes the same sample in this process with no gRPC (`LibvirtHypervisor::stats`, one per second) and reports this
//! process's CPU: the floor of the agent's own CPU per round.
//!
//! Environment: `VCB_BACKEND` (`sim`, default, or `libvirt`), `VCB_URI` (default `qemu:///system`), `VCB_SECS`
//! (length of each window, default 30), `VCB_PORT` (default 21980), `VCB_DOMAINS` (simulated domains, default 32).

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::Semaphore;
use vcpu_balancer::controller::client::{AgentClient, DEFAULT_RPC_TIMEOUT};
use vcpu_balancer::controller::host::{HostWorker, LoopConfig};
use vcpu_balancer::controller::report::ActionType;

use common::{proc_cpu_seconds, proc_status_kib, proc_thread_cpu_ns, summarize, thread_cpu_delta_s, ChildGuard, TempDir};

// The allocator of the shipped binaries (agent/main.rs, controller/main.rs), so that a figure and its floor in
// this process are measured as they run in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_SECS: u64 = 30;
const DEFAULT_PORT: u16 = 21980;
const DEFAULT_DOMAINS: u32 = 32;
/// Simulated host: 8 pCPUs, 32 one-vCPU domains, 4 per pCPU, pinned and balanced (no pins are sent).
const SIM_PCPUS: u32 = 8;
const SIM_LOAD: u32 = 20;
/// One controller round per second, as the brief of the benchmark asks.
const ROUND_INTERVAL: Duration = Duration::from_secs(1);
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What one window measured.
struct Window {
    secs: f64,
    /// From per-thread schedstat (ns resolution).
    agent_cpu_s: f64,
    /// From utime + stime (10 ms ticks, includes threads that exited): a cross-check.
    agent_ticks_s: f64,
    agent_rss_kib: Vec<f64>,
    libvirtd_cpu_s: Option<f64>,
    libvirtd_ticks_s: Option<f64>,
    rounds: u64,
}

fn libvirtd_pid() -> Option<u32> {
    let out = Command::new("pidof").arg("libvirtd").output().ok()?;
    String::from_utf8_lossy(&out.stdout).split_whitespace().next()?.parse().ok()
}

/// Samples the agent (and libvirtd) for `secs`; with `worker`, one controller round per [`ROUND_INTERVAL`].
async fn window(agent: u32, libvirtd: Option<u32>, secs: u64, mut worker: Option<&mut HostWorker>) -> anyhow::Result<Window> {
    let start = Instant::now();
    let cpu0 = proc_cpu_seconds(agent)?;
    let lv0 = libvirtd.map(proc_cpu_seconds).transpose()?;
    let th0 = proc_thread_cpu_ns(agent)?;
    let lvth0 = libvirtd.map(proc_thread_cpu_ns).transpose()?;
    let mut rss = Vec::new();
    let mut rounds = 0u64;
    let mut next_sample = start;
    let mut ticker = tokio::time::interval(ROUND_INTERVAL);
    let end = start + Duration::from_secs(secs);
    while Instant::now() < end {
        ticker.tick().await;
        if let Some(w) = worker.as_deref_mut() {
            rounds += 1;
            let r = w.round(1_000 + rounds).await;
            if r.action.kind == ActionType::Error {
                bail!("controller round failed: {}", r.action.reason);
            }
        }
        if Instant::now() >= next_sample {
            rss.push(proc_status_kib(&agent.to_string(), "VmRSS")? as f64);
            next_sample += SAMPLE_INTERVAL;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let agent_cpu_s = thread_cpu_delta_s(&th0, &proc_thread_cpu_ns(agent)?);
    let agent_ticks_s = proc_cpu_seconds(agent)? - cpu0;
    let libvirtd_cpu_s = match (libvirtd, lvth0) {
        (Some(p), Some(t0)) => Some(thread_cpu_delta_s(&t0, &proc_thread_cpu_ns(p)?)),
        _ => None,
    };
    let libvirtd_ticks_s = match (libvirtd, lv0) {
        (Some(p), Some(c0)) => Some(proc_cpu_seconds(p)? - c0),
        _ => None,
    };
    Ok(Window { secs, agent_cpu_s, agent_ticks_s, agent_rss_kib: rss, libvirtd_cpu_s, libvirtd_ticks_s, rounds })
}

fn main() -> anyhow::Result<()> {
    let backend = std::env::var("VCB_BACKEND").unwrap_or_else(|_| "sim".to_string());
    let uri = std::env::var("VCB_URI").unwrap_or_else(|_| "qemu:///system".to_string());
    let secs: u64 = env_or("VCB_SECS", DEFAULT_SECS);
    let port: u16 = env_or("VCB_PORT", DEFAULT_PORT);
    let ndomains: u32 = env_or("VCB_DOMAINS", DEFAULT_DOMAINS);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tmp = TempDir::new("cost")?;

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vcpu-agent"));
    cmd.args(["--listen", &addr.to_string()]).env("RUST_LOG", "warn");
    let libvirtd = match backend.as_str() {
        "sim" => {
            let scenario = tmp.path().join("cost.toml");
            std::fs::write(&scenario, common::balanced_scenario(SIM_PCPUS, ndomains, 1, SIM_LOAD))?;
            cmd.args(["--backend", "sim", "--scenario"]).arg(&scenario);
            None
        }
        "libvirt" => {
            cmd.args(["--backend", "libvirt", "--uri", &uri]);
            Some(libvirtd_pid().context("libvirtd is not running")?)
        }
        other => bail!("VCB_BACKEND must be sim or libvirt, got {other:?}"),
    };
    let mut agent = ChildGuard::spawn(cmd, "vcpu-agent")?;
    agent.wait_listening(addr)?;
    let pid = agent.pid();

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (idle, busy, domains) = rt.block_on(async {
        let cfg = LoopConfig { dry_run: true, ..LoopConfig::default() };
        let mut worker = HostWorker::new(AgentClient::new(&addr.to_string(), DEFAULT_RPC_TIMEOUT)?, cfg, Arc::new(Semaphore::new(1)));
        // One round connects and checks the host; then the agent idles with the connection open, as between rounds.
        let first = worker.round(1).await;
        if first.action.kind == ActionType::Error {
            bail!("agent unreachable: {}", first.action.reason);
        }
        let mut client = AgentClient::new(&addr.to_string(), DEFAULT_RPC_TIMEOUT)?;
        let domains = client.get_stats().await?.domains.len();
        drop(client);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = window(pid, libvirtd, secs, None).await?;
        let busy = window(pid, libvirtd, secs, Some(&mut worker)).await?;
        anyhow::Ok((idle, busy, domains))
    })?;

    println!("# agent_cost: backend {backend}, {domains} domains, windows of {secs} s, one round per {ROUND_INTERVAL:?}");
    println!("| window | rounds | agent CPU % of one core | agent CPU ms/round | agent CPU s (ticks) | agent VmRSS MiB (median [min–max]) | libvirtd CPU % | libvirtd CPU ms/round | libvirtd CPU s (ticks) | agent / libvirtd |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, w) in [("idle", &idle), ("1 round/s", &busy)] {
        let rss: Vec<f64> = w.agent_rss_kib.iter().map(|k| k / 1024.0).collect();
        let per_round = |c: f64| if w.rounds > 0 { format!("{:.2}", c * 1e3 / w.rounds as f64) } else { "–".into() };
        let (lv_pct, lv_round, ratio) = match w.libvirtd_cpu_s {
            Some(l) => (
                format!("{:.3}", l / w.secs * 100.0),
                per_round(l),
                if l > 0.0 { format!("{:.2}", w.agent_cpu_s / l) } else { "–".into() },
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        println!(
            "| {name} | {} | {:.3} | {} | {:.2} | {} | {lv_pct} | {lv_round} | {} | {ratio} |",
            w.rounds,
            w.agent_cpu_s / w.secs * 100.0,
            per_round(w.agent_cpu_s),
            w.agent_ticks_s,
            summarize(&rss),
            w.libvirtd_ticks_s.map(|t| format!("{t:.2}")).unwrap_or_else(|| "–".into()),
        );
    }
    println!(
        "\nCPU from per-thread schedstat (ns); the ticks columns (utime+stime, 1/{} s) are a coarse cross-check.",
        common::CLK_TCK
    );
    #[cfg(feature = "libvirt")]
    if backend == "libvirt" {
        let floor = rt.block_on(floor_window(&uri, libvirtd, secs))?;
        let agent_ms = busy.agent_cpu_s * 1e3 / busy.rounds.max(1) as f64;
        println!("\nThe same sample made in this process, once per {ROUND_INTERVAL:?}, with no gRPC (`LibvirtHypervisor::stats`):\n");
        println!("| rounds | floor CPU ms/round (this process) | libvirtd CPU ms/round | agent CPU ms/round (above) | agent / floor |");
        println!("|---:|---:|---:|---:|---:|");
        println!(
            "| {} | {:.2} | {:.2} | {agent_ms:.2} | {:.2} |",
            floor.0,
            floor.1 * 1e3 / floor.0 as f64,
            floor.2 * 1e3 / floor.0 as f64,
            agent_ms / (floor.1 * 1e3 / floor.0 as f64)
        );
    }
    Ok(())
}

/// The floor of the agent's CPU: the same libvirt sample made in this process, one per [`ROUND_INTERVAL`] for
/// `secs`. Returns (rounds, this process's CPU s, libvirtd's CPU s).
#[cfg(feature = "libvirt")]
async fn floor_window(uri: &str, libvirtd: Option<u32>, secs: u64) -> anyhow::Result<(u64, f64, f64)> {
    use vcpu_balancer::hypervisor::libvirt::LibvirtHypervisor;
    use vcpu_balancer::hypervisor::Hypervisor;
    let hv = LibvirtHypervisor::new(uri);
    hv.stats().await?; // connects, as the agent was connected before its window
    let me = std::process::id();
    let lv = libvirtd.context("libvirtd is not running")?;
    let (t0, l0) = (proc_thread_cpu_ns(me)?, proc_thread_cpu_ns(lv)?);
    let mut ticker = tokio::time::interval(ROUND_INTERVAL);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut rounds = 0;
    while Instant::now() < end {
        ticker.tick().await;
        hv.stats().await?;
        rounds += 1;
    }
    Ok((rounds, thread_cpu_delta_s(&t0, &proc_thread_cpu_ns(me)?), thread_cpu_delta_s(&l0, &proc_thread_cpu_ns(lv)?)))
}
