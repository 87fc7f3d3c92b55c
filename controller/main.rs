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
use vcpu_balancer::security::ClientTls;
use vcpu_balancer::certs;
use vcpu_balancer::controller::client::PinFailure;
use vcpu_balancer::controller::config::{self, ControllerConfig, Overrides, RunSettings, TlsPaths};
use vcpu_balancer::controller::policy::{Constraints, DomainMatcher, PolicyKind};
use vcpu_balancer::controller::state::{ConfigView, StateStore};
use vcpu_balancer::controller::{self, demo, evaluate, pins_file, policy, show, AgentClient, ClientSettings, LoopConfig, Observers};
use vcpu_balancer::metrics::ControllerMetrics;
use vcpu_balancer::security::TlsFiles;
use vcpu_balancer::model::{parse_cpu_list, PinRequest};
use vcpu_balancer::telemetry::{self, LogFormat};

// glibc's malloc took about a third of the controller's CPU at 100 hosts x 64 vCPUs, much of it waiting on arena
// locks between tokio's worker threads; mimalloc halved the CPU of a round (BENCHMARKS.md, "Controller rounds").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Evaluate policies on scenario files in virtual time and print a table of balancing metrics.
    Evaluate(EvaluateArgs),
    /// Make a CA and mutual-TLS certificates for the agents and the controller of a small fleet.
    Certs(CertsArgs),
    /// Print a shell completion script on stdout (e.g. `vcpu-controller completions bash`).
    Completions {
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout; used to build the Debian package.
    #[command(hide = true)]
    Man,
}

/// Mutual TLS to the agents: all three or none.
#[derive(Debug, Args)]
struct TlsArgs {
    /// The controller's TLS certificate (PEM); with --tls-key and --tls-ca turns on mutual TLS.
    #[arg(long, env = "VCPU_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The controller's TLS private key (PEM).
    #[arg(long, env = "VCPU_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that must have signed every agent's certificate.
    #[arg(long, env = "VCPU_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    fn client_config(&self) -> anyhow::Result<Option<ClientTls>> {
        let files = TlsFiles::from_flags(self.tls_cert.clone(), self.tls_key.clone(), self.tls_ca.clone())?;
        Ok(files.as_ref().map(TlsFiles::client_tls).transpose()?)
    }
}

#[derive(Debug, Args)]
struct CertsArgs {
    /// Directory to write into (created if missing; existing files are never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Agent host, exactly as the controller dials it (DNS name or IP address, no port); repeat.
    #[arg(long = "host", value_delimiter = ',', required = true)]
    hosts: Vec<String>,
    /// The controller's identity; agents let it pin by default only if it is the default.
    #[arg(long, default_value = vcpu_balancer::security::DEFAULT_PIN_IDENTITY)]
    controller_name: String,
    /// Also make a read-only client certificate with this identity (e.g. for monitoring); repeat.
    #[arg(long = "reader", value_delimiter = ',')]
    readers: Vec<String>,
}

#[derive(Debug, Args)]
struct PolicyArgs {
    /// Balancing policy: seed (the literal 10% rule), guarded (the 10% rule with the guard) or converge
    /// [default: converge].
    #[arg(long, env = "VCPU_POLICY", value_parser = parse_policy)]
    policy: Option<PolicyKind>,
    /// Act when busiest − freest pCPU usage exceeds this many points.
    #[arg(long, env = "VCPU_THRESHOLD", default_value_t = policy::DEFAULT_THRESHOLD, value_parser = parse_threshold)]
    threshold: f64,
    /// Same as --policy seed (kept for compatibility): the literal 10% rule, which can move the same load back
    /// and forth forever (see README).
    #[arg(long, env = "VCPU_NO_GUARD", value_parser = vcpu_balancer::flags::switch)]
    no_guard: bool,
    #[command(flatten)]
    constraints: ConstraintArgs,
}

#[derive(Debug, Args)]
struct ConstraintArgs {
    /// Never move or pin domains matching this name glob (e.g. 'db-*') or UUID; repeat for several.
    #[arg(long = "exclude", env = "VCPU_EXCLUDE", value_delimiter = ',', value_parser = parse_exclude)]
    exclude: Vec<String>,
    /// pCPUs that are never a target (e.g. 0-1); vCPUs found there are moved off when possible.
    #[arg(long = "reserve-pcpus", env = "VCPU_RESERVE_PCPUS", value_parser = parse_pcpus)]
    reserve_pcpus: Option<CpuList>,
    /// Move vCPUs that someone else pinned since the controller's last pin (by default they are left alone).
    #[arg(long, env = "VCPU_OVERRIDE_MANUAL", value_parser = vcpu_balancer::flags::switch)]
    override_manual: bool,
    /// Move at most this many vCPUs per host and round (at least 1); the moves that even the load most are made
    /// first, the rest of the plan waits for the next rounds [default: no limit].
    #[arg(long, env = "VCPU_MAX_MOVES", value_parser = parse_max_moves)]
    max_moves: Option<std::num::NonZeroUsize>,
}

#[derive(Debug, Args)]
struct EvaluateArgs {
    /// Directory of scenario files; every *.toml in it is a scenario.
    #[arg(long, default_value = "scenarios")]
    scenarios: PathBuf,
    /// Policies to evaluate, comma-separated or repeated.
    #[arg(long = "policy", value_delimiter = ',', default_value = "seed,guarded,converge", value_parser = parse_policy)]
    policies: Vec<PolicyKind>,
    /// Rounds per scenario and policy (at least 1).
    #[arg(long, default_value_t = evaluate::DEFAULT_EVAL_ROUNDS, value_parser = parse_rounds)]
    rounds: u64,
    /// Virtual time between rounds.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: Duration,
    /// Balanced means busiest − freest pCPU usage at or under this many points.
    #[arg(long, default_value_t = policy::DEFAULT_THRESHOLD, value_parser = parse_threshold)]
    threshold: f64,
    #[command(flatten)]
    constraints: ConstraintArgs,
    /// One JSON object per scenario and policy instead of the table.
    #[arg(long)]
    json: bool,
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
    /// Balancing policy: seed (the literal 10% rule), guarded (the 10% rule with the guard) or converge
    /// [default: converge].
    #[arg(long, env = "VCPU_POLICY", value_parser = parse_policy)]
    policy: Option<PolicyKind>,
    /// Act when busiest − freest pCPU usage exceeds this many points [default: 10].
    #[arg(long, env = "VCPU_THRESHOLD", value_parser = parse_threshold)]
    threshold: Option<f64>,
    /// Same as --policy seed (kept for compatibility): the literal 10% rule, which can move the same load back
    /// and forth forever (see README).
    #[arg(long, env = "VCPU_NO_GUARD", value_parser = vcpu_balancer::flags::switch)]
    no_guard: bool,
    #[command(flatten)]
    constraints: ConstraintArgs,
    /// Serve the status page and /api/state (and /metrics) on this address, e.g. 127.0.0.1:9180.
    #[arg(long, env = "VCPU_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics on this address at /metrics, e.g. 0.0.0.0:9181.
    #[arg(long, env = "VCPU_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Stop after this many rounds per host.
    #[arg(long, env = "VCPU_ROUNDS", value_parser = parse_rounds)]
    rounds: Option<u64>,
    /// Compute and report, pin nothing.
    #[arg(long, env = "VCPU_DRY_RUN", value_parser = vcpu_balancer::flags::switch)]
    dry_run: bool,
    /// Print one JSON object per host per round on stdout.
    #[arg(long)]
    json: bool,
    /// Deadline of each RPC [default: 800ms].
    #[arg(long, env = "VCPU_RPC_TIMEOUT", value_parser = config::parse_rpc_timeout)]
    rpc_timeout: Option<Duration>,
    /// Most RPCs in flight at once across all hosts [default: 256].
    #[arg(long, env = "VCPU_MAX_INFLIGHT", value_parser = parse_max_inflight)]
    max_inflight: Option<usize>,
    /// Keep each host's memory of the controller's own pins in this directory (created if missing), so that after a
    /// restart the controller still tells its pins from an operator's [default: in memory only].
    #[arg(long, env = "VCPU_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
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
    #[arg(long, env = "VCPU_RPC_TIMEOUT", default_value = "800ms", value_parser = config::parse_rpc_timeout)]
    rpc_timeout: Duration,
    #[command(flatten)]
    tls: TlsArgs,
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
    #[arg(long, env = "VCPU_RPC_TIMEOUT", default_value = "5s", value_parser = config::parse_rpc_timeout)]
    rpc_timeout: Duration,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Time between rounds.
    #[arg(long, default_value = "400ms", value_parser = parse_interval)]
    interval: Duration,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Give up after this many rounds (at least 1).
    #[arg(long, default_value_t = demo::DEFAULT_DEMO_MAX_ROUNDS, value_parser = parse_rounds)]
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

fn parse_max_inflight(s: &str) -> Result<usize, String> {
    s.parse::<i128>().map_err(|_| "not a whole number".to_string()).and_then(config::check_max_inflight)
}

/// `--rounds 0` would do nothing and exit 0, which reads as "balanced".
fn parse_rounds(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a whole number greater than zero")),
    }
}

fn parse_max_moves(s: &str) -> Result<std::num::NonZeroUsize, String> {
    s.parse::<usize>()
        .ok()
        .and_then(std::num::NonZeroUsize::new)
        .ok_or_else(|| format!("{s:?} is not a whole number greater than zero (to move nothing, use --dry-run)"))
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

/// One `--exclude` pattern, trimmed: `VCPU_EXCLUDE='db-*, web-*'` means `web-*`, not a glob starting with a space
/// that matches nothing (and so protects nothing).
fn parse_exclude(s: &str) -> Result<String, String> {
    vcpu_balancer::flags::nonblank(s, "pattern (a name glob such as 'db-*', or a UUID)")
}

fn parse_policy(s: &str) -> Result<PolicyKind, String> {
    s.parse()
}

fn constraints_of(c: &ConstraintArgs) -> Constraints {
    Constraints {
        exclude: c.exclude.iter().map(|e| DomainMatcher::parse(e)).collect(),
        reserved: c.reserve_pcpus.as_ref().map(|l| l.0.clone()).unwrap_or_default(),
        override_manual: c.override_manual,
        max_moves: c.max_moves,
    }
}

fn policy_of(p: &PolicyArgs) -> anyhow::Result<policy::PolicyConfig> {
    // --no-guard predates --policy and means exactly the literal rule.
    let kind = config::policy_kind(p.no_guard, p.policy, None).map_err(anyhow::Error::msg)?;
    Ok(policy::PolicyConfig { kind, threshold: p.threshold, constraints: constraints_of(&p.constraints) })
}

async fn cmd_run(a: RunArgs) -> anyhow::Result<i32> {
    // First: the reload handler starts only once the listeners are bound, and a SIGHUP before then must not kill us.
    let sighup = config::hangup_signal().context("cannot handle SIGHUP")?;
    vcpu_balancer::agent::fleet::raise_fd_limit();
    let file = match &a.config {
        Some(p) => ControllerConfig::from_file(p)?,
        None => ControllerConfig::default(),
    };
    let flags = Overrides {
        hosts: a.hosts.clone(),
        interval: a.interval,
        rpc_timeout: a.rpc_timeout,
        max_inflight: a.max_inflight,
        state_dir: a.state_dir.clone(),
        policy: a.policy,
        threshold: a.threshold,
        no_guard: a.no_guard,
        exclude: a.constraints.exclude.clone(),
        reserve_pcpus: a.constraints.reserve_pcpus.as_ref().map(|l| l.0.clone()),
        override_manual: a.constraints.override_manual,
        max_moves: a.constraints.max_moves,
        dry_run: a.dry_run,
        http_listen: a.http_listen,
        metrics_listen: a.metrics_listen,
        tls: TlsPaths { cert: a.tls.tls_cert.clone(), key: a.tls.tls_key.clone(), ca: a.tls.tls_ca.clone() },
    };
    let set = RunSettings::resolve(&flags, &file).map_err(anyhow::Error::msg)?;
    let clients = ClientSettings {
        rpc_timeout: set.rpc_timeout,
        tls: set.tls.as_ref().map(TlsFiles::client_tls).transpose()?,
    };
    // Every address is checked before any host is contacted: a typo refuses the whole command.
    for h in &set.hosts {
        clients.client(h)?;
    }
    if set.rpc_timeout * 2 > set.interval {
        tracing::warn!(rpc_timeout = ?set.rpc_timeout, interval = ?set.interval,
            "two RPC deadlines do not fit in one interval; slow hosts will skip ticks");
    }
    let _state_lock = match &set.state_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("state directory {}: cannot create it", dir.display()))?;
            // A dry run writes nothing there, so it may run beside the controller that does.
            (!set.dry_run).then(|| pins_file::lock_dir(dir)).transpose()?
        }
        None => None,
    };
    let cfg = LoopConfig {
        interval: set.interval,
        policy: set.policy.clone(),
        dry_run: set.dry_run,
        rounds: a.rounds,
        max_inflight: set.max_inflight,
        state_dir: set.state_dir.clone(),
    };
    let stop = CancellationToken::new();
    let metrics = (set.metrics_listen.is_some() || set.http_listen.is_some()).then(ControllerMetrics::new);
    let state = set.http_listen.map(|_| {
        StateStore::new(ConfigView {
            interval_ms: set.interval.as_millis() as u64,
            threshold: set.policy.threshold,
            policy: set.policy.kind.as_str().to_string(),
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
    let hup = tokio::spawn(config::reload_on_sighup(sighup, set.clone(), flags, a.config.clone(), reload_tx));
    let (tx, mut rx) = controller::report_channel(set.hosts.len());
    let obs = Observers { state, metrics };
    let ctl = tokio::spawn(controller::run_dynamic(set.hosts.clone(), clients, cfg, obs, reload_rx, tx, stop.clone()));
    let printer = if a.json {
        let queue = controller::REPORT_BUFFER_PER_HOST * set.hosts.len().max(1);
        tokio::spawn(controller::report::write_json_lines(rx, std::io::stdout(), queue))
    } else {
        tokio::spawn(async move { while rx.recv().await.is_some() {} })
    };
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
    let failed = result??;
    let _ = printer.await;
    // `--rounds` ended the balancing: the status page and metrics stop with it.
    stop.cancel();
    for s in servers {
        let _ = s.await;
    }
    // A script running `run --rounds N` learns from the exit code whether every host ended reachable and obeyed.
    for (host, why) in &failed {
        tracing::error!(host = %host, reason = %why, "the host's last round failed");
    }
    Ok(if failed.is_empty() { 0 } else { EX_UNAVAILABLE })
}

async fn cmd_show(a: ShowArgs) -> anyhow::Result<i32> {
    let mut c = AgentClient::with_tls(&a.host, a.rpc_timeout, a.tls.client_config()?.as_ref())?;
    let info = c.host_info().await?;
    let u = show::sample(&mut c, a.window).await?;
    let spread = policy::decide_once(&u, &policy::PolicyConfig::default()).spread;
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
    let mut c = AgentClient::with_tls(&a.host, a.rpc_timeout, a.tls.client_config()?.as_ref())?;
    let pin = PinRequest { domain: a.domain.clone(), vcpu: a.vcpu, pcpus: a.pcpu.0.clone(), persist: a.persist };
    let e = match c.pin_vcpu(pin).await {
        Ok(()) => {
            println!("pinned {} vCPU {} to pCPU {}", a.domain, a.vcpu, vcpu_balancer::model::format_cpu_list(&a.pcpu.0));
            return Ok(0);
        }
        Err(e) => e,
    };
    match controller::client::pin_failure(&e) {
        PinFailure::NotSent => eprintln!("vcpu-controller: pin not sent (nothing changed): {}", e.message()),
        PinFailure::NotConfirmed => eprintln!(
            "vcpu-controller: pin not confirmed: {}; the agent may still apply it, check with `vcpu-controller show --host {}`",
            e.message(),
            a.host
        ),
        PinFailure::Refused => {
            eprintln!("vcpu-controller: pin refused: {:?}: {}", e.code().unwrap_or(tonic::Code::Unknown), e.message())
        }
    }
    Ok(EX_UNAVAILABLE)
}

async fn cmd_demo(a: DemoArgs) -> anyhow::Result<i32> {
    let mut cfg = demo::DemoConfig { interval: a.interval, policy: policy_of(&a.policy)?, max_rounds: a.max_rounds, ..Default::default() };
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

fn cmd_evaluate(a: EvaluateArgs) -> anyhow::Result<i32> {
    let scenarios = evaluate::load_dir(&a.scenarios)?;
    if scenarios.is_empty() {
        anyhow::bail!("{}: no *.toml scenario files", a.scenarios.display());
    }
    let mut results = Vec::new();
    for (name, sc) in &scenarios {
        for &kind in &a.policies {
            let cfg = policy::PolicyConfig { kind, threshold: a.threshold, constraints: constraints_of(&a.constraints) };
            results.push(evaluate::evaluate(name, sc, &cfg, a.rounds, a.interval));
        }
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        for r in &results {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
    } else {
        write!(out, "{}", evaluate::table(&results))?;
    }
    Ok(0)
}

fn cmd_certs(a: CertsArgs) -> anyhow::Result<i32> {
    let spec = certs::FleetSpec { hosts: a.hosts, controller: a.controller_name, readers: a.readers };
    for w in certs::generate_fleet(&a.out, &spec)? {
        println!("{}  {}", w.path.display(), w.what);
    }
    println!(
        "next: copy ca.crt and agent-HOST.crt/.key to each host (vcpu-agent --tls-cert --tls-key --tls-ca), and run \
         the controller with --tls-cert controller.crt --tls-key controller.key --tls-ca ca.crt"
    );
    Ok(0)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // The demo prints its own tables on stdout; per-round log lines would only repeat them.
    let level = if matches!(cli.cmd, Cmd::Demo(_) | Cmd::Evaluate(_)) { "warn" } else { "info" };
    telemetry::init(cli.log_format, level);
    let r = match cli.cmd {
        Cmd::Run(a) => cmd_run(a).await,
        Cmd::Show(a) => cmd_show(a).await,
        Cmd::Pin(a) => cmd_pin(a).await,
        Cmd::Demo(a) => cmd_demo(a).await,
        Cmd::Evaluate(a) => cmd_evaluate(a),
        Cmd::Certs(a) => cmd_certs(a),
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
