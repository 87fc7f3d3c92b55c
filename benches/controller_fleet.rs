//! Controller rounds on simulated fleets, against the floor of the same RPCs (BENCHMARKS.md, "Controller rounds on
//! simulated fleets"). Run: `cargo bench --bench controller_fleet`.
//!
//! For each fleet (10, 100 and 1,000 hosts of 16 vCPUs; 100 hosts of 64 vCPUs):
//! - the simulated agents run in their own process (`vcpu-agent --backend sim --sim-hosts N`);
//! - the floor server runs in another process (this binary re-executed with `VCB_ROLE=floor-server`): on every
//!   port it answers `GetStats` with the bytes the real simulated agent sent for host 0, pre-encoded;
//! - a controller round is [`HostWorker::round`] for every host at once (one task per host, as `controller run`
//!   does), bounded by a semaphore of [`DEFAULT_MAX_INFLIGHT`] permits; a floor round is one bare tonic unary call
//!   with the raw-bytes codec per host, one task per host, bounded by a semaphore of the same size;
//! - controller and floor rounds alternate (which goes first alternates too), and the ratio of each pair is
//!   reported: median and spread;
//! - after each pair, the same bare calls on the controller's own transport, and bare calls to the real simulated
//!   agents (same bytes, but the agents' own work included: on one machine their CPU competes with the
//!   controller's, which the pre-encoded floor server's does not), each with its ratio to that controller round.
//!
//! Peak memory: for the 1,000-host fleet, a separate process runs only the controller's rounds (or only the floor's)
//! and reports its `VmHWM`, so the driver's own allocations do not count.
//!
//! Environment: `VCB_REPS` (pairs of rounds per fleet, default 15), `VCB_PORT_BASE` (first port, default 21000;
//! the agents use `BASE..BASE+N`, the floor server `BASE+2000..`), `VCB_FLEETS` (e.g. `10x16,1000x16`).

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::Semaphore;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};
use vcpu_balancer::controller::transport::H2Channel;
use vcpu_balancer::controller::client::{AgentClient, DEFAULT_RPC_TIMEOUT};
use vcpu_balancer::controller::host::{HostWorker, LoopConfig, DEFAULT_MAX_INFLIGHT};
use vcpu_balancer::controller::report::ActionType;

use common::{
    fixed_reply_server, local_addrs, own_channel, raw_get_stats, spawn_fixed_reply_server, summarize, ChildGuard,
    TempDir,
};

// The allocator of the shipped binaries (agent/main.rs, controller/main.rs), so that a figure and its floor in
// this process are measured as they run in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Fleets measured by default: (hosts, vCPUs per host).
const FLEETS: &[(usize, u32)] = &[(10, 16), (100, 16), (100, 64), (1000, 16)];
/// vCPUs per simulated domain; domains per host = vCPUs / this.
const VCPUS_PER_DOMAIN: u32 = 2;
/// Load of every simulated vCPU (% of one pCPU); irrelevant to the cost, but non-zero so usage is computed.
const LOAD: u32 = 40;
/// Pairs of timed rounds per fleet.
const DEFAULT_REPS: usize = 15;
/// Rounds before timing: the baseline round, then one round that computes usage and connects everything.
const WARMUP_ROUNDS: u64 = 2;
/// Below the kernel's ephemeral range (32768–60999), so that outgoing connections never hold a port the servers need.
const DEFAULT_PORT_BASE: u16 = 21000;
/// How long the simulated agents run before the floor's reply is taken from host 0 (see where it is used).
const FLOOR_CAPTURE_DELAY: Duration = Duration::from_millis(1500);
/// The floor server's ports start this far above the agents'.
const FLOOR_PORT_OFFSET: u16 = 2000;
/// Fleet whose peak controller memory is measured (target ≤ 64 MiB).
const MEMORY_FLEET_HOSTS: usize = 1000;
/// Rounds run by the memory-measuring processes: a short run, and a long one to see whether memory stays flat.
const MEMORY_ROUNDS: [u64; 2] = [20, 200];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; this driver has no flags of its own.
    vcpu_balancer::agent::fleet::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match std::env::var("VCB_ROLE").as_deref() {
        Ok("floor-server") => rt.block_on(fixed_reply_server()),
        Ok("controller-memory") => rt.block_on(memory_child(true)),
        Ok("floor-memory") => rt.block_on(memory_child(false)),
        Ok(other) => bail!("unknown VCB_ROLE {other:?}"),
        Err(_) => rt.block_on(driver()),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The two kinds of rounds.

/// One controller per host, as `controller run` builds them.
fn controller(hosts: &[SocketAddr]) -> anyhow::Result<(Vec<HostWorker>, Arc<Semaphore>)> {
    let cfg = LoopConfig { max_inflight: DEFAULT_MAX_INFLIGHT, ..LoopConfig::default() };
    let inflight = Arc::new(Semaphore::new(cfg.max_inflight));
    let workers = hosts
        .iter()
        .map(|a| Ok(HostWorker::new(AgentClient::new(&a.to_string(), DEFAULT_RPC_TIMEOUT)?, cfg.clone(), inflight.clone())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((workers, inflight))
}

/// One round of every host at once; fails if any host's round failed or pinned something (then it would not be
/// comparable with one bare call).
async fn controller_round(workers: Vec<HostWorker>, round: u64) -> anyhow::Result<(Vec<HostWorker>, Duration)> {
    let start = Instant::now();
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|mut w| {
            tokio::spawn(async move {
                let r = w.round(round).await;
                (w, r)
            })
        })
        .collect();
    let mut back = Vec::with_capacity(tasks.len());
    let mut bad = None;
    for t in tasks {
        let (w, r) = t.await?;
        if r.action.kind == ActionType::Error || r.pins_applied > 0 || !r.pins_failed.is_empty() {
            bad.get_or_insert_with(|| format!("{}: {:?}: {} (pins {})", r.host, r.action.kind, r.action.reason, r.pins_applied));
        }
        back.push(w);
    }
    let took = start.elapsed();
    if let Some(b) = bad {
        bail!("controller round {round}: {b}");
    }
    Ok((back, took))
}

/// Channels to the floor server, configured like the controller's.
/// A bare client for one host: a tonic `Channel` (the floor the issue names), or the controller's own transport
/// (the same bare calls, on what the controller runs on).
#[derive(Clone)]
enum Bare {
    Tonic(Channel, Uri),
    Own(H2Channel, Uri),
}

fn floor_channels(hosts: &[SocketAddr]) -> anyhow::Result<Vec<Bare>> {
    hosts
        .iter()
        .map(|a| {
            let uri: Uri = format!("http://{a}").parse()?;
            let ch = Endpoint::from(uri.clone())
                .connect_timeout(DEFAULT_RPC_TIMEOUT)
                .timeout(DEFAULT_RPC_TIMEOUT)
                .tcp_nodelay(true)
                .connect_lazy();
            Ok(Bare::Tonic(ch, uri))
        })
        .collect()
}

fn own_channels(hosts: &[SocketAddr]) -> anyhow::Result<Vec<Bare>> {
    hosts
        .iter()
        .map(|&a| {
            let (ch, uri) = own_channel(a, DEFAULT_RPC_TIMEOUT)?;
            Ok(Bare::Own(ch, uri))
        })
        .collect()
}

/// One bare unary call per host at once, each holding a permit of `inflight` while in flight.
async fn floor_round(channels: &[Bare], inflight: &Arc<Semaphore>, expect_len: usize) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let tasks: Vec<_> = channels
        .iter()
        .map(|c| {
            let c = c.clone();
            let inflight = inflight.clone();
            tokio::spawn(async move {
                let _permit = inflight.acquire_owned().await.expect("never closed");
                match c {
                    Bare::Tonic(ch, uri) => raw_get_stats(ch, uri, DEFAULT_RPC_TIMEOUT).await,
                    Bare::Own(ch, uri) => raw_get_stats(ch, uri, DEFAULT_RPC_TIMEOUT).await,
                }
            })
        })
        .collect();
    for t in tasks {
        let b = t.await??;
        // expect_len 0: replies of the real agent, whose size varies by a few bytes with its clock.
        if expect_len != 0 && b.len() != expect_len {
            bail!("floor reply of {} bytes, expected {expect_len}", b.len());
        }
    }
    Ok(start.elapsed())
}

// ---------------------------------------------------------------------------------------------------------------
// Peak memory of a process that runs only one side.

async fn memory_child(is_controller: bool) -> anyhow::Result<()> {
    let n: usize = std::env::var("VCB_HOSTS")?.parse()?;
    let base: u16 = std::env::var("VCB_BASE")?.parse()?;
    let rounds: u64 = std::env::var("VCB_ROUNDS")?.parse()?;
    let hosts = local_addrs(base, n);
    let before = common::proc_status_kib("self", "VmRSS")?;
    if is_controller {
        let (mut workers, _) = controller(&hosts)?;
        for r in 1..=rounds {
            workers = controller_round(workers, r).await?.0;
        }
    } else {
        let channels = floor_channels(&hosts)?;
        let inflight = Arc::new(Semaphore::new(DEFAULT_MAX_INFLIGHT));
        let len: usize = std::env::var("VCB_REPLY_LEN")?.parse()?;
        for _ in 0..rounds {
            floor_round(&channels, &inflight, len).await?;
        }
    }
    let hwm = common::proc_status_kib("self", "VmHWM")?;
    let rss = common::proc_status_kib("self", "VmRSS")?;
    println!("{hwm} {rss} {before}");
    Ok(())
}

fn run_memory_child(role: &str, hosts: usize, base: u16, rounds: u64, reply_len: usize) -> anyhow::Result<(u64, u64, u64)> {
    let out = Command::new(std::env::current_exe()?)
        .env("VCB_ROLE", role)
        .env("VCB_HOSTS", hosts.to_string())
        .env("VCB_BASE", base.to_string())
        .env("VCB_ROUNDS", rounds.to_string())
        .env("VCB_REPLY_LEN", reply_len.to_string())
        .output()?;
    if !out.status.success() {
        bail!("{role} child failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let s = String::from_utf8(out.stdout)?;
    let v: Vec<u64> = s.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    Ok((v[0], v[1], v[2]))
}

// ---------------------------------------------------------------------------------------------------------------

fn parse_fleets() -> anyhow::Result<Vec<(usize, u32)>> {
    match std::env::var("VCB_FLEETS") {
        Err(_) => Ok(FLEETS.to_vec()),
        Ok(s) => s
            .split(',')
            .map(|f| {
                let (h, v) = f.split_once('x').context("VCB_FLEETS: expected HOSTSxVCPUS")?;
                Ok((h.trim().parse()?, v.trim().parse()?))
            })
            .collect(),
    }
}

async fn driver() -> anyhow::Result<()> {
    let reps: usize = env_or("VCB_REPS", DEFAULT_REPS);
    let base: u16 = env_or("VCB_PORT_BASE", DEFAULT_PORT_BASE);
    let tmp = TempDir::new("fleet")?;
    println!("# controller_fleet: {reps} pairs of rounds per fleet, max in flight {DEFAULT_MAX_INFLIGHT}, 2 vCPUs per domain");
    println!("| hosts | vCPUs/host | reply bytes | controller round ms | floor round ms (tonic Channel) | ratio (median [min–max]) | bare calls on the controller's transport ms | ratio to those | bare calls to the real agent ms | ratio to those | controller CPU ms/round | floor client CPU ms/round |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut memory_lines = Vec::new();
    for (nhosts, vcpus) in parse_fleets()? {
        let domains = vcpus / VCPUS_PER_DOMAIN;
        let scenario = tmp.path().join(format!("bench-{vcpus}.toml"));
        // As many pCPUs as domains: one domain per pCPU, balanced and pinned.
        std::fs::write(&scenario, common::balanced_scenario(domains, domains, VCPUS_PER_DOMAIN, LOAD))?;

        let mut agent_cmd = Command::new(env!("CARGO_BIN_EXE_vcpu-agent"));
        agent_cmd
            .args(["--backend", "sim", "--scenario"])
            .arg(&scenario)
            .args(["--sim-hosts", &nhosts.to_string(), "--listen", &format!("127.0.0.1:{base}")])
            .args(["--listen-base", &base.to_string()])
            .env("RUST_LOG", "warn");
        let agent_hosts = local_addrs(base, nhosts);
        let mut agent = ChildGuard::spawn(agent_cmd, "simulated fleet agent")?;
        agent.wait_listening(*agent_hosts.last().expect("at least one host"))?;

        // The floor's bytes: what the real simulated agent sends for host 0, once its vCPU times have the length
        // they keep for the rest of the run (a varint grows a byte when a time passes 2^28 ns, 0.67 s at this load).
        // Taken at once, a fleet that started quickly gave the floor replies 25 bytes shorter than the agents'.
        tokio::time::sleep(FLOOR_CAPTURE_DELAY).await;
        let uri0: Uri = format!("http://{}", agent_hosts[0]).parse()?;
        let ch0 = Endpoint::from(uri0.clone()).connect().await?;
        let reply = raw_get_stats(ch0, uri0, DEFAULT_RPC_TIMEOUT).await?;
        let floor_base = base + FLOOR_PORT_OFFSET;
        let floor = spawn_fixed_reply_server(&reply, &tmp, floor_base, nhosts)?;
        let floor_hosts = local_addrs(floor_base, nhosts);

        let (mut workers, inflight) = controller(&agent_hosts)?;
        let floor_inflight = Arc::new(Semaphore::new(inflight.available_permits()));
        let channels = floor_channels(&floor_hosts)?;
        let own = own_channels(&floor_hosts)?;
        for r in 1..=WARMUP_ROUNDS {
            workers = controller_round(workers, r).await?.0;
            floor_round(&channels, &floor_inflight, reply.len()).await?;
            floor_round(&own, &floor_inflight, reply.len()).await?;
        }
        let (mut ctrl, mut flo, mut ratio, mut raw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut own_ms, mut own_ratio, mut raw_ratio) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ctrl_cpu, mut floor_cpu) = (Vec::new(), Vec::new());
        let agent_channels = floor_channels(&agent_hosts)?;
        floor_round(&agent_channels, &floor_inflight, 0).await?;
        for rep in 0..reps {
            let round = WARMUP_ROUNDS + 1 + rep as u64;
            // Alternate the order so that neither side always runs right after the other's burst. This process's
            // own CPU is read around each round: what the controller spends beyond the bare calls.
            let me = std::process::id();
            let (c, f) = if rep % 2 == 0 {
                let t0 = common::proc_thread_cpu_ns(me)?;
                let (w, c) = controller_round(workers, round).await?;
                let t1 = common::proc_thread_cpu_ns(me)?;
                workers = w;
                let f = floor_round(&channels, &floor_inflight, reply.len()).await?;
                let t2 = common::proc_thread_cpu_ns(me)?;
                ctrl_cpu.push(common::thread_cpu_delta_s(&t0, &t1) * 1e3);
                floor_cpu.push(common::thread_cpu_delta_s(&t1, &t2) * 1e3);
                (c, f)
            } else {
                let t0 = common::proc_thread_cpu_ns(me)?;
                let f = floor_round(&channels, &floor_inflight, reply.len()).await?;
                let t1 = common::proc_thread_cpu_ns(me)?;
                let (w, c) = controller_round(workers, round).await?;
                let t2 = common::proc_thread_cpu_ns(me)?;
                workers = w;
                floor_cpu.push(common::thread_cpu_delta_s(&t0, &t1) * 1e3);
                ctrl_cpu.push(common::thread_cpu_delta_s(&t1, &t2) * 1e3);
                (c, f)
            };
            // The same bare calls on the controller's own transport, next to the round they are compared with.
            let o = floor_round(&own, &floor_inflight, reply.len()).await?;
            own_ms.push(o.as_secs_f64() * 1e3);
            own_ratio.push(c.as_secs_f64() / o.as_secs_f64());
            // Where the gap goes: the same bare calls, but to the real simulated agent (its server-side work
            // included, the controller's decode and decision excluded).
            let a = floor_round(&agent_channels, &floor_inflight, 0).await?;
            raw.push(a.as_secs_f64() * 1e3);
            raw_ratio.push(c.as_secs_f64() / a.as_secs_f64());
            ctrl.push(c.as_secs_f64() * 1e3);
            flo.push(f.as_secs_f64() * 1e3);
            ratio.push(c.as_secs_f64() / f.as_secs_f64());
        }
        drop(workers);
        drop(channels);
        drop(own);
        drop(agent_channels);
        println!(
            "| {nhosts} | {vcpus} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            reply.len(),
            summarize(&ctrl),
            summarize(&flo),
            summarize(&ratio),
            summarize(&own_ms),
            summarize(&own_ratio),
            summarize(&raw),
            summarize(&raw_ratio),
            summarize(&ctrl_cpu),
            summarize(&floor_cpu)
        );
        if nhosts == MEMORY_FLEET_HOSTS {
            for rounds in MEMORY_ROUNDS {
                let c = run_memory_child("controller-memory", nhosts, base, rounds, reply.len())?;
                let f = run_memory_child("floor-memory", nhosts, floor_base, rounds, reply.len())?;
                memory_lines.push(format!(
                    "| {nhosts} | {vcpus} | {rounds} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
                    c.0 as f64 / 1024.0,
                    c.1 as f64 / 1024.0,
                    f.0 as f64 / 1024.0,
                    f.1 as f64 / 1024.0,
                    c.0 as f64 / f.0 as f64
                ));
            }
        }
        drop(floor);
        drop(agent);
    }
    if !memory_lines.is_empty() {
        println!("\nPeak memory, each side alone in its own process (VmHWM and VmRSS at the end, MiB):\n");
        println!("| hosts | vCPUs/host | rounds | controller VmHWM | controller VmRSS | floor client VmHWM | floor client VmRSS | ratio (HWM) |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
        for m in memory_lines {
            println!("{m}");
        }
    }
    Ok(())
}
