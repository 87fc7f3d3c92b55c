//! Agent `GetStats` on real guests against the libvirt calls it wraps (BENCHMARKS.md, "Agent GetStats on real
//! guests"). Run (root, libvirtd running, KVM testbed available):
//! `cargo bench --features libvirt --bench agent_libvirt`.
//!
//! For 1, 8 and 32 running guests (started with `scripts/testbed up --prefix vcbbench`, always torn down with
//! `scripts/testbed down --prefix vcbbench`), every repetition times each variant once, in an order shuffled afresh
//! for each repetition (seeded):
//! - `agent`: one `GetStats` through the gRPC client to a `vcpu-agent --backend libvirt` process (the product);
//! - `floor`: [`LibvirtHypervisor::stats`] in this process, no gRPC: the very calls the agent makes
//!   (`virConnectListAllDomains`, then per domain `virDomainGetInfo` + `virDomainGetVcpus`, on up to
//!   [`MAX_PARALLEL_READS`] blocking tasks);
//! - `per-domain sequential`: the same calls on one task;
//! - `bulk + GetVcpus`: one `virConnectGetAllDomainStats(VCPU|CPU_TOTAL)` plus one `virDomainGetVcpus` per domain
//!   (parallel like the floor), the complete sample the bulk way;
//! - `bulk + GetVcpus sequential`;
//! - `bulk only`: the bulk call alone (no pCPU or affinity: not a usable sample, its cost only);
//! - `bare gRPC call`: one unary call on the controller's transport to a server that answers with the agent's own
//!   reply for this many guests, pre-encoded (this binary re-executed with `VCB_ROLE=floor-server`, on port
//!   `VCB_PORT` + 1): the transport's cost alone. A last row adds it to the floor per repetition: the least an agent
//!   that answers over gRPC could take.
//!
//! Each figure is reported with its ratio to the floor of the same repetition (median and spread).
//!
//! Environment: `VCB_URI` (default `qemu:///system`), `VCB_GUESTS` (default `1,8,32`), `VCB_PREFIX` (default
//! `vcbbench`), `VCB_CLIENT_RT` (`current`, the default, or `multi`: the tokio runtime of this process, which
//! drives the agent client and the floor alike), `VCB_SETTLE_SECS` (wait after starting guests, default 15),
//! `VCB_LOAD` (testbed load of every guest, default 0 = idle), `VCB_BUSY` (this many of the guests run
//! at 100 % instead, default 0), `VCB_REPS` (default 40), `VCB_PORT` (agent port, default 21990; the bare call's
//! server takes the next one), `VCB_TESTBED` (default `scripts/testbed` of this repository), `VCB_NO_TESTBED=1`
//! (measure the domains already running, e.g. with `VCB_URI=test:///default VCB_GUESTS=1`), `VCB_NO_BARE=1` (leave
//! the bare call out of the repetitions; its row then reads 0, and the sum row the floor), `VCB_KEEP_GUESTS=1`
//! (leave the guests running after a successful run, for `agent_cost`; the caller then runs
//! `scripts/testbed down --prefix vcbbench`).

#[path = "common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tonic::codegen::http::Uri;
use vcpu_balancer::controller::client::AgentClient;
use vcpu_balancer::controller::transport::H2Channel;
use vcpu_balancer::hypervisor::libvirt::{LibvirtHypervisor, MAX_PARALLEL_READS};
use vcpu_balancer::hypervisor::Hypervisor;
use vcpu_balancer::model::HostStats;

use common::{
    fixed_reply_server, own_channel, raw_get_stats, spawn_fixed_reply_server, summarize, ChildGuard, TempDir,
};

// The allocator of the shipped binaries (agent/main.rs, controller/main.rs), so that a figure and its floor in
// this process are measured as they run in production.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_GUESTS: &str = "1,8,32";
const DEFAULT_PREFIX: &str = "vcbbench";
const DEFAULT_REPS: usize = 40;
const DEFAULT_PORT: u16 = 21990;
/// Seconds to wait after starting guests, before measuring, so that their boot is over.
const DEFAULT_SETTLE_S: u64 = 15;
/// Untimed calls of every variant before timing (connections opened, caches warm).
const WARMUP: usize = 3;
/// Deadline of the agent RPC: far above any expected sample, so a slow one is measured rather than cut.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `testbed up` waits for guests to boot: 32 TCG guests booting at once on 2 busy cores need more than the
/// script's default 120 s.
const BOOT_TIMEOUT_S: u32 = 400;
/// Seed of the order in which each repetition times the variants.
const ORDER_SEED: u64 = 0x5eed_0a6e;
/// Load of a busy guest (`VCB_BUSY`), % of one pCPU.
const BUSY_LOAD: u32 = 100;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The testbed guests of one prefix; `down` runs when this is dropped, also when the driver fails (unless `keep`,
/// for a caller that measures more on the same guests and tears them down itself).
struct Testbed {
    script: String,
    prefix: String,
    started: usize,
    keep: bool,
}

impl Testbed {
    /// Starts guests until `total` run, named `g0`, `g1`, ...; the first `busy` run at [`BUSY_LOAD`].
    fn grow_to(&mut self, total: usize, load: u32, busy: usize) -> anyhow::Result<()> {
        if total <= self.started {
            return Ok(());
        }
        let specs: Vec<String> = (self.started..total)
            .map(|i| format!("g{i}:{}", if i < busy { BUSY_LOAD } else { load }))
            .collect();
        let t = Instant::now();
        let st = Command::new(&self.script)
            .args(["up", "--prefix", &self.prefix, "--timeout", &BOOT_TIMEOUT_S.to_string()])
            .args(&specs)
            .stdout(std::process::Stdio::null())
            .status()
            .context("cannot run the testbed script")?;
        if !st.success() {
            bail!("testbed up failed ({st})");
        }
        eprintln!("started {} guests in {:.1}s", specs.len(), t.elapsed().as_secs_f64());
        self.started = total;
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.keep && !std::thread::panicking() {
            eprintln!("keeping {} guests of prefix {} (VCB_KEEP_GUESTS=1)", self.started, self.prefix);
            return;
        }
        let st = Command::new(&self.script).args(["down", "--prefix", &self.prefix]).status();
        if !matches!(st, Ok(s) if s.success()) {
            eprintln!("WARNING: `{} down --prefix {}` failed: {st:?}", self.script, self.prefix);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Agent,
    Floor,
    Sequential,
    Bulk,
    BulkSequential,
    BulkOnly,
    Bare,
}

const VARIANTS: [Variant; 7] = [
    Variant::Agent,
    Variant::Floor,
    Variant::Sequential,
    Variant::Bulk,
    Variant::BulkSequential,
    Variant::BulkOnly,
    Variant::Bare,
];

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Variant::Agent => "agent GetStats (gRPC, per-domain parallel)",
            Variant::Floor => "floor: in-process per-domain parallel",
            Variant::Sequential => "in-process per-domain sequential",
            Variant::Bulk => "in-process bulk + GetVcpus parallel",
            Variant::BulkSequential => "in-process bulk + GetVcpus sequential",
            Variant::BulkOnly => "in-process bulk call only (incomplete)",
            Variant::Bare => "bare gRPC call, the agent's reply bytes (no libvirt)",
        }
    }
}

struct Setup {
    client: AgentClient,
    parallel: LibvirtHypervisor,
    sequential: LibvirtHypervisor,
    /// The controller's transport to the fixed-reply server of the current guest count, and its origin.
    bare: Option<(H2Channel, Uri)>,
}

/// Times one call of `v`: the sample it returned, or `None` for the bare call (its reply is the agent's, replayed).
async fn run(setup: &mut Setup, v: Variant) -> anyhow::Result<(Duration, Option<HostStats>)> {
    let t = Instant::now();
    let s = match v {
        Variant::Agent => setup.client.get_stats().await?,
        Variant::Floor => setup.parallel.stats().await?,
        Variant::Sequential => setup.sequential.stats().await?,
        Variant::Bulk => setup.parallel.stats_bulk(true).await?,
        Variant::BulkSequential => setup.sequential.stats_bulk(true).await?,
        Variant::BulkOnly => setup.parallel.stats_bulk(false).await?,
        Variant::Bare => {
            let (ch, uri) = setup.bare.clone().context("no fixed-reply server")?;
            raw_get_stats(ch, uri, RPC_TIMEOUT).await?;
            return Ok((t.elapsed(), None));
        }
    };
    Ok((t.elapsed(), Some(s)))
}

fn vcpu_count(s: &HostStats) -> usize {
    s.domains.iter().map(|d| d.vcpus.len()).sum()
}

fn main() -> anyhow::Result<()> {
    if std::env::var("VCB_ROLE").is_ok_and(|r| r == "floor-server") {
        // The agent's own runtime flavour (multi-thread), so that the bare server differs from it only by its work.
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        return rt.block_on(fixed_reply_server());
    }
    let uri = std::env::var("VCB_URI").unwrap_or_else(|_| "qemu:///system".to_string());
    let counts: Vec<usize> = std::env::var("VCB_GUESTS")
        .unwrap_or_else(|_| DEFAULT_GUESTS.to_string())
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("VCB_GUESTS: expected e.g. 1,8,32")?;
    let reps: usize = env_or("VCB_REPS", DEFAULT_REPS);
    let load: u32 = env_or("VCB_LOAD", 0);
    let busy: usize = env_or("VCB_BUSY", 0);
    let port: u16 = env_or("VCB_PORT", DEFAULT_PORT);
    let settle_s: u64 = env_or("VCB_SETTLE_SECS", DEFAULT_SETTLE_S);
    let use_testbed = std::env::var("VCB_NO_TESTBED").map(|v| v != "1").unwrap_or(true);
    let script = std::env::var("VCB_TESTBED")
        .unwrap_or_else(|_| format!("{}/scripts/testbed", env!("CARGO_MANIFEST_DIR")));
    let prefix = std::env::var("VCB_PREFIX").unwrap_or_else(|_| DEFAULT_PREFIX.to_string());

    let mut testbed = use_testbed.then(|| Testbed { script, prefix, started: 0, keep: false });
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vcpu-agent"));
    cmd.args(["--backend", "libvirt", "--uri", &uri, "--listen", &addr.to_string()]).env("RUST_LOG", "warn");
    let mut agent = ChildGuard::spawn(cmd, "vcpu-agent (libvirt)")?;
    agent.wait_listening(addr)?;

    // One caller on one thread, like the CLI or grpcurl: a multi-thread client runtime adds its own cross-thread
    // wake-ups to every agent round trip (about 0.2 ms on the 2-core VM of BENCHMARKS.md), which is the client's cost,
    // not the agent's. `VCB_CLIENT_RT=multi` measures with the multi-thread runtime instead (both figure and floor).
    let multi = std::env::var("VCB_CLIENT_RT").is_ok_and(|v| v == "multi");
    let rt = if multi {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    };
    // The gRPC channel spawns its connection task on the runtime it is created in.
    let _guard = rt.enter();
    let mut setup = Setup {
        client: AgentClient::new(&addr.to_string(), RPC_TIMEOUT)?,
        parallel: LibvirtHypervisor::new(&uri),
        sequential: LibvirtHypervisor::with_parallel_reads(&uri, 1),
        bare: None,
    };
    let bare_port = port + 1;
    let bare_index = VARIANTS.iter().position(|&v| v == Variant::Bare).expect("the bare call is a variant");
    // Without the bare call the repetitions are those of runs 1 to 7 (BENCHMARKS.md): its neighbours shift the
    // agent's ratio a little, and this shows by how much.
    let skip_bare = std::env::var("VCB_NO_BARE").is_ok_and(|v| v == "1");
    let tmp = TempDir::new("agent-libvirt")?;
    println!(
        "# agent_libvirt: uri {uri}, {reps} repetitions, guests load {load} ({busy} at {BUSY_LOAD}), parallel reads {MAX_PARALLEL_READS}, {} client runtime",
        if multi { "multi-thread" } else { "current-thread" }
    );
    println!("| guests | vCPUs | variant | ms (median [min–max]) | ratio to floor (median [min–max]) |");
    println!("|---:|---:|---|---:|---:|");
    for &n in &counts {
        if let Some(tb) = testbed.as_mut() {
            tb.grow_to(n, load, busy)?;
            // Guests that just booted still run their init for a while: measured at once, the first size's figures
            // carried their boot (up to 20 ms per call with 1 guest).
            std::thread::sleep(Duration::from_secs(settle_s));
        }
        // The bare call carries what the agent answers for this many guests: its reply, taken once and replayed.
        let (ch, uri) = own_channel(addr, RPC_TIMEOUT)?;
        let reply = rt.block_on(raw_get_stats(ch, uri, RPC_TIMEOUT))?;
        let bare_server = spawn_fixed_reply_server(&reply, &tmp, bare_port, 1)?;
        setup.bare = Some(own_channel(SocketAddr::from(([127, 0, 0, 1], bare_port)), RPC_TIMEOUT)?);
        rt.block_on(async {
            for v in VARIANTS {
                for _ in 0..WARMUP {
                    let (_, s) = run(&mut setup, v).await?;
                    let seen = s.map_or(n, |s| s.domains.len());
                    if use_testbed && seen != n {
                        bail!("{v:?} saw {seen} running domains, expected {n} (other guests on this host?)");
                    }
                }
            }
            // One row more: per repetition, the floor plus the bare call, the least any agent behind gRPC could take.
            let mut ms: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len() + 1];
            let mut ratio: Vec<Vec<f64>> = vec![Vec::new(); VARIANTS.len() + 1];
            let mut vcpus = 0;
            let mut rng = StdRng::seed_from_u64(ORDER_SEED ^ n as u64);
            for _ in 0..reps {
                let mut took = [0.0f64; VARIANTS.len()];
                // A fresh order every repetition (seeded, so runs are repeatable): a variant can leave libvirtd or
                // QEMU busy for a moment, and a fixed or merely rotated order would always charge that to the same
                // neighbour (with a rotation, the agent followed the bulk-only call in five repetitions of six).
                let mut order: [usize; VARIANTS.len()] = std::array::from_fn(|i| i);
                order.shuffle(&mut rng);
                for i in order {
                    if i == bare_index && skip_bare {
                        continue;
                    }
                    let (d, s) = run(&mut setup, VARIANTS[i]).await?;
                    took[i] = d.as_secs_f64() * 1e3;
                    if let (Variant::Floor, Some(s)) = (VARIANTS[i], &s) {
                        vcpus = vcpu_count(s);
                    }
                }
                let floor = took[1];
                let sum = floor + took[bare_index];
                for (i, t) in took.into_iter().chain([sum]).enumerate() {
                    ms[i].push(t);
                    ratio[i].push(t / floor);
                }
            }
            let labels = VARIANTS.iter().map(|v| v.label()).chain(["floor + bare gRPC call (sum per repetition)"]);
            for (i, label) in labels.enumerate() {
                println!("| {n} | {vcpus} | {label} | {} | {} |", summarize(&ms[i]), summarize(&ratio[i]));
            }
            Ok(())
        })?;
        setup.bare = None;
        drop(bare_server);
    }
    drop(agent);
    if let Some(tb) = testbed.as_mut() {
        // Only a successful run keeps its guests: on an error `?` above drops the testbed with keep unset.
        tb.keep = std::env::var("VCB_KEEP_GUESTS").is_ok_and(|v| v == "1");
    }
    drop(testbed);
    Ok(())
}
