//! `vcpu-controller`: balances the vCPUs of one or many hosts through their agents, pins by hand, shows a host,
//! or runs the simulated demo. Parses flags, sets up tracing and signals, and hands over to the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use vcpu_balancer::controller::config::{self, ControllerConfig, Overrides, RunSettings};
use vcpu_balancer::controller::state::{ConfigView, StateStore};
use vcpu_balancer::controller::{self, demo, policy, show, AgentClient, LoopConfig, Observers};
use vcpu_balancer::metrics::ControllerMetrics;
use vcpu_balancer::model::{parse_cpu_list, PinRequest};
use vcpu_balancer::telemetry::{self, LogFormat};

/// Exit code for invalid configuration (sysexits EX_USAGE).
const EX_USAGE: i32 = 64;
/// Exit code when the agent refused or could not be reached (sysexits EX_UNAVAILABLE).
const EX_UNAVAILABLE: i32 = 69;
/// How long a graceful shutdown may take before the controller exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(name = "vcpu-controller", version, about = "vcpu-balancer controller: keeps the pCPUs of KVM hosts evenly loaded")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "VCPU_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Balance hosts every interval.
    Run(RunArgs),
    /// Sample one host over a short window and print its pCPU table.
    Show(ShowArgs),
    /// Pin one vCPU by hand.
    Pin(PinArgs),
    /// Run the controller on simulated hosts in this process (no hypervisor needed).
    Demo(DemoArgs),
    /// Print a shell completion script on stdout (e.g. `vcpu-controller completions bash`).
    Completions {
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout; used to build the Debian package.
    #[command(hide = true)]
    Man,
}

#[derive(Debug, Args)]
struct PolicyArgs {
    /// Act when busiest − freest pCPU usage exceeds this many points.
    #[arg(long, env = "VCPU_THRESHOLD", default_value_t = policy::DEFAULT_THRESHOLD, value_parser = parse_threshold)]
    threshold: f64,
    /// Apply the literal 10% rule, which can move the same load back and forth forever (see README).
    #[arg(long, env = "VCPU_NO_GUARD")]
    no_guard: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Config file (TOML); flags and their environment variables override it. SIGHUP re-reads its host list.
    #[arg(long, env = "VCPU_CONFIG")]
    config: Option<PathBuf>,
    /// Agent address (HOST, HOST:PORT or http://HOST:PORT); repeat for several hosts, or comma-separate in the env.
    #[arg(long = "host", env = "VCPU_HOSTS", value_delimiter = ',', required_unless_present = "config")]
    hosts: Vec<String>,
    /// Time between rounds (e.g. 2s, 500ms) [default: 2s].
    #[arg(long, env = "VCPU_INTERVAL", value_parser = parse_interval)]
    interval: Option<Duration>,
    /// Act when busiest − freest pCPU usage exceeds this many points [default: 10].
    #[arg(long, env = "VCPU_THRESHOLD", value_parser = parse_threshold)]
    threshold: Option<f64>,
    /// Apply the literal 10% rule, which can move the same load back and forth forever (see README).
    #[arg(long, env = "VCPU_NO_GUARD")]
    no_guard: bool,
    /// Serve the status page and /api/state (and /metrics) on this address, e.g. 127.0.0.1:9180.
    #[arg(long, env = "VCPU_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics on this address at /metrics, e.g. 0.0.0.0:9181.
    #[arg(long, env = "VCPU_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Stop after this many rounds per host.
    #[arg(long, env = "VCPU_ROUNDS")]
    rounds: Option<u64>,
    /// Compute and report, pin nothing.
    #[arg(long, env = "VCPU_DRY_RUN")]
    dry_run: bool,
    /// Print one JSON object per host per round on stdout.
    #[arg(long)]
    json: bool,
    /// Deadline of each RPC [default: 800ms].
    #[arg(long, env = "VCPU_RPC_TIMEOUT", value_parser = parse_duration)]
    rpc_timeout: Option<Duration>,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// Agent address.
    #[arg(long, env = "VCPU_HOST")]
    host: String,
    /// Sampling window.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    window: Duration,
    /// Deadline of each RPC.
    #[arg(long, env = "VCPU_RPC_TIMEOUT", default_value = "800ms", value_parser = parse_duration)]
    rpc_timeout: Duration,
}

#[derive(Debug, Args)]
struct PinArgs {
    /// Agent address.
    #[arg(long, env = "VCPU_HOST")]
    host: String,
    /// Domain name or UUID.
    #[arg(long)]
    domain: String,
    /// vCPU index.
    #[arg(long)]
    vcpu: u32,
    /// Target pCPU, or a list such as 0-3,6.
    #[arg(long, value_parser = parse_pcpus)]
    pcpu: CpuList,
    /// Also write the pinning to the domain's persistent config.
    #[arg(long)]
    persist: bool,
    /// Deadline of the RPC.
    #[arg(long, env = "VCPU_RPC_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    rpc_timeout: Duration,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Time between rounds.
    #[arg(long, default_value = "400ms", value_parser = parse_interval)]
    interval: Duration,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Give up after this many rounds.
    #[arg(long, default_value_t = demo::DEFAULT_DEMO_MAX_ROUNDS)]
    max_rounds: u64,
    /// Built-in scenarios to simulate, one host each.
    #[arg(long = "scenario", value_delimiter = ',')]
    scenarios: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    config::parse_interval(s)
}

fn parse_threshold(s: &str) -> Result<f64, String> {
    let t: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    config::check_threshold(t)
}

/// A parsed pCPU list argument.
#[derive(Debug, Clone)]
struct CpuList(Vec<u32>);

fn parse_pcpus(s: &str) -> Result<CpuList, String> {
    parse_cpu_list(s).map(CpuList)
}

/// Prints the man page or a completion script of this binary.
fn print_generated(cmd: &Cmd) -> anyhow::Result<i32> {
    let mut c = Cli::command();
    let mut out = std::io::stdout();
    match cmd {
        Cmd::Completions { shell } => clap_complete::generate(*shell, &mut c, "vcpu-controller", &mut out),
        _ => clap_mangen::Man::new(c).render(&mut out)?,
    }
    Ok(0)
}

fn policy_of(p: &PolicyArgs) -> policy::PolicyConfig {
    policy::PolicyConfig { threshold: p.threshold, guard: !p.no_guard }
}

async fn cmd_run(a: RunArgs) -> anyhow::Result<i32> {
    let file = match &a.config {
        Some(p) => ControllerConfig::from_file(p)?,
        None => ControllerConfig::default(),
    };
    let flags = Overrides {
        hosts: a.hosts.clone(),
        interval: a.interval,
        rpc_timeout: a.rpc_timeout,
        threshold: a.threshold,
        no_guard: a.no_guard,
        dry_run: a.dry_run,
        http_listen: a.http_listen,
        metrics_listen: a.metrics_listen,
    };
    let set = RunSettings::resolve(&flags, &file).map_err(anyhow::Error::msg)?;
    for h in &set.hosts {
        controller::client::normalize_address(h)?;
    }
    if set.rpc_timeout * 2 > set.interval {
        tracing::warn!(rpc_timeout = ?set.rpc_timeout, interval = ?set.interval,
            "two RPC deadlines do not fit in one interval; slow hosts will skip ticks");
    }
    if set.tls != config::TlsPaths::default() {
        tracing::warn!("tls paths are checked but not used yet: TLS support is not in this build");
    }
    let cfg = LoopConfig { interval: set.interval, policy: set.policy, dry_run: set.dry_run, rounds: a.rounds };
    let stop = CancellationToken::new();
    let metrics = (set.metrics_listen.is_some() || set.http_listen.is_some()).then(ControllerMetrics::new);
    let state = set.http_listen.map(|_| {
        StateStore::new(ConfigView {
            interval_ms: set.interval.as_millis() as u64,
            threshold: set.policy.threshold,
            guard: set.policy.guard,
            dry_run: set.dry_run,
        })
    });
    // Bind before starting any host, so a busy port refuses the command before anything is pinned. The status
    // page serves /metrics too, so the same fixed address for both means one listener.
    let mut servers = Vec::new();
    if let (Some(addr), Some(st)) = (set.http_listen, &state) {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let router = vcpu_balancer::http::status_router(st.clone(), metrics.clone());
        servers.push(tokio::spawn(vcpu_balancer::http::serve(l, router, stop.clone().cancelled_owned())));
    }
    if let (Some(addr), Some(m)) = (set.metrics_listen.filter(|a| a.port() == 0 || Some(*a) != set.http_listen), &metrics) {
        let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
        let router = vcpu_balancer::http::metrics_router(Arc::clone(m));
        servers.push(tokio::spawn(vcpu_balancer::http::serve(l, router, stop.clone().cancelled_owned())));
    }
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let hup = tokio::spawn(config::reload_on_sighup(set.clone(), flags, a.config.clone(), reload_tx));
    let (tx, mut rx) = controller::report_channel(set.hosts.len());
    let obs = Observers { state, metrics };
    let ctl = tokio::spawn(controller::run_dynamic(set.hosts.clone(), set.rpc_timeout, cfg, obs, reload_rx, tx, stop.clone()));
    let json = a.json;
    let printer = tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            if json {
                if let Ok(line) = serde_json::to_string(&r) {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                }
            }
        }
    });
    let result = tokio::select! {
        r = ctl => r,
        () = vcpu_balancer::shutdown::signal() => {
            stop.cancel();
            if tokio::time::timeout(SHUTDOWN_GRACE, printer).await.is_err() {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "shutdown did not complete in time; exiting");
            }
            return Ok(0);
        }
    };
    hup.abort();
    result??;
    let _ = printer.await;
    // `--rounds` ended the balancing: the status page and metrics stop with it.
    stop.cancel();
    for s in servers {
        let _ = s.await;
    }
    Ok(0)
}

async fn cmd_show(a: ShowArgs) -> anyhow::Result<i32> {
    let mut c = AgentClient::new(&a.host, a.rpc_timeout)?;
    let info = c.host_info().await?;
    let u = show::sample(&mut c, a.window).await?;
    let spread = policy::decide(&u, &policy::PolicyConfig::default()).spread;
    println!(
        "{} ({} backend, {} pCPUs online of {}), usage over {:?}, spread {:.1}",
        info.hostname,
        info.backend,
        info.online_pcpus.len(),
        info.npcpus,
        a.window,
        spread
    );
    print!("{}", show::table(&u));
    Ok(0)
}

async fn cmd_pin(a: PinArgs) -> anyhow::Result<i32> {
    let mut c = AgentClient::new(&a.host, a.rpc_timeout)?;
    let pin = PinRequest { domain: a.domain.clone(), vcpu: a.vcpu, pcpus: a.pcpu.0.clone(), persist: a.persist };
    match c.pin_vcpu(pin).await {
        Ok(()) => {
            println!("pinned {} vCPU {} to pCPU {}", a.domain, a.vcpu, vcpu_balancer::model::format_cpu_list(&a.pcpu.0));
            Ok(0)
        }
        Err(e) => {
            eprintln!("vcpu-controller: pin refused: {:?}: {}", e.code().unwrap_or(tonic::Code::Unknown), e.message());
            Ok(EX_UNAVAILABLE)
        }
    }
}

async fn cmd_demo(a: DemoArgs) -> anyhow::Result<i32> {
    let mut cfg = demo::DemoConfig { interval: a.interval, policy: policy_of(&a.policy), max_rounds: a.max_rounds, ..Default::default() };
    if !a.scenarios.is_empty() {
        cfg.scenarios = a.scenarios;
    }
    let mut out = std::io::stdout();
    let outcomes = tokio::select! {
        r = demo::run_demo(cfg, &mut out) => r?,
        () = vcpu_balancer::shutdown::signal() => return Ok(130),
    };
    Ok(if outcomes.values().all(demo::HostOutcome::done) { 0 } else { 1 })
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // The demo prints its own tables on stdout; per-round log lines would only repeat them.
    let level = if matches!(cli.cmd, Cmd::Demo(_)) { "warn" } else { "info" };
    telemetry::init(cli.log_format, level);
    let r = match cli.cmd {
        Cmd::Run(a) => cmd_run(a).await,
        Cmd::Show(a) => cmd_show(a).await,
        Cmd::Pin(a) => cmd_pin(a).await,
        Cmd::Demo(a) => cmd_demo(a).await,
        c @ (Cmd::Completions { .. } | Cmd::Man) => print_generated(&c),
    };
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vcpu-controller: error: {e:#}");
            let code = if e.downcast_ref::<controller::ClientError>().is_some_and(|c| c.code().is_some()) { EX_UNAVAILABLE } else { EX_USAGE };
            std::process::exit(code);
        }
    }
}
