//! `vcpu-agent`: serves the vcpu-balancer gRPC API for one hypervisor host (libvirt) or a simulated one.
//! Parses flags, sets up tracing and signals, and hands over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};
use vcpu_balancer::agent::fleet;
use vcpu_balancer::agent::ServeOptions;
use vcpu_balancer::hypervisor::instrumented::Instrumented;
use vcpu_balancer::hypervisor::sim::{scenario, MonotonicClock, Scenario, SimHypervisor};
use vcpu_balancer::hypervisor::{Hypervisor, LIBVIRT_CALL_DEADLINE, MIN_LIBVIRT_CALL_DEADLINE};
use vcpu_balancer::metrics::AgentMetrics;
use vcpu_balancer::security::{self, PinPolicy, TlsFiles};
use vcpu_balancer::telemetry::{self, LogFormat};

// The controller's allocator too (controller/main.rs). For the agent the evidence is thinner: with 32 KVM guests it
// cost 14.8 ms of CPU per round on mimalloc against 18.3 ms on glibc's malloc, in two runs 20 minutes apart, for
// about 1 MiB more resident memory (BENCHMARKS.md, "Agent cost").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for invalid configuration (sysexits EX_USAGE).
const EX_USAGE: i32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// The host's libvirt daemon (production).
    Libvirt,
    /// A simulated host read from a scenario file.
    Sim,
}

#[derive(Debug, Parser)]
#[command(name = "vcpu-agent", version, about = "vcpu-balancer agent: exposes a hypervisor host's vCPUs over gRPC")]
struct Cli {
    /// Address to serve gRPC on.
    #[arg(long, env = "VCPU_AGENT_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], vcpu_balancer::DEFAULT_AGENT_PORT)))]
    listen: SocketAddr,
    /// Which hypervisor to serve.
    #[arg(long, env = "VCPU_AGENT_BACKEND", value_enum, required = true)]
    backend: Option<Backend>,
    /// libvirt connection URI (backend libvirt).
    #[arg(long, env = "VCPU_AGENT_URI", default_value = "qemu:///system")]
    uri: String,
    /// Deadline of every libvirt call, a whole stats sample included (backend libvirt; at least 100ms). Past it the
    /// agent answers UNAVAILABLE: a daemon that hangs without dying would otherwise hold calls for as long as it hangs.
    #[arg(long, env = "VCPU_AGENT_LIBVIRT_TIMEOUT", value_parser = parse_libvirt_timeout,
          default_value_t = humantime::Duration::from(LIBVIRT_CALL_DEADLINE))]
    libvirt_timeout: humantime::Duration,
    /// Scenario for the simulated host: a TOML file, or the name of a built-in scenario (backend sim).
    #[arg(long, env = "VCPU_AGENT_SCENARIO", default_value = "all-on-one")]
    scenario: String,
    /// Hostname the simulated host reports (backend sim; default: the scenario's `hostname`, else this machine's name
    /// with a "sim-" prefix).
    #[arg(long, env = "VCPU_AGENT_SIM_HOSTNAME")]
    sim_hostname: Option<String>,
    /// Serve this many simulated hosts from this process, on consecutive ports (backend sim).
    #[arg(long, env = "VCPU_AGENT_SIM_HOSTS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    sim_hosts: u16,
    /// First port of the simulated fleet (default: the --listen port; 0 = any free ports).
    #[arg(long, env = "VCPU_AGENT_LISTEN_BASE")]
    listen_base: Option<u16>,
    /// Log format on stderr.
    #[arg(long, env = "VCPU_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// This agent's TLS certificate (PEM); with --tls-key and --tls-ca turns on mutual TLS.
    #[arg(long, env = "VCPU_AGENT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// This agent's TLS private key (PEM).
    #[arg(long, env = "VCPU_AGENT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that must have signed every client's certificate.
    #[arg(long, env = "VCPU_AGENT_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client identity (certificate CN or DNS SAN) allowed to pin; repeat, or comma-separate in the env. Others may
    /// only read. Default with TLS: "vcpu-controller".
    #[arg(long = "pin-allow", env = "VCPU_AGENT_PIN_ALLOW", value_delimiter = ',', value_parser = parse_identity)]
    pin_allow: Vec<String>,
    /// Serve plaintext on a non-loopback address (anyone who reaches the port can pin: firewall it).
    #[arg(long, env = "VCPU_AGENT_INSECURE", value_parser = vcpu_balancer::flags::switch)]
    insecure: bool,
    /// Serve Prometheus metrics on this address at /metrics, e.g. 0.0.0.0:9182.
    #[arg(long, env = "VCPU_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Print a shell completion script on stdout and exit.
    #[arg(long, value_name = "SHELL", exclusive = true)]
    completions: Option<clap_complete::Shell>,
    /// Print the man page (roff) on stdout and exit; used to build the Debian package.
    #[arg(long, hide = true, exclusive = true)]
    man: bool,
}

/// Serves `hv`, timed and counted at the `Hypervisor` boundary when metrics are on.
async fn serve_backend<H: Hypervisor>(
    hv: Arc<H>,
    backend: &'static str,
    listener: tokio::net::TcpListener,
    opts: ServeOptions,
) -> anyhow::Result<()> {
    let shutdown = vcpu_balancer::shutdown::signal();
    match opts.metrics.clone() {
        Some(m) => {
            let hv = Arc::new(Instrumented::new(hv, backend, m));
            vcpu_balancer::agent::serve_with(hv, listener, opts, shutdown).await?;
        }
        None => vcpu_balancer::agent::serve_with(hv, listener, opts, shutdown).await?,
    }
    Ok(())
}

fn parse_libvirt_timeout(s: &str) -> Result<humantime::Duration, String> {
    let d = vcpu_balancer::controller::config::parse_duration(s)?;
    if d < MIN_LIBVIRT_CALL_DEADLINE {
        return Err(format!("must be at least {}", humantime::format_duration(MIN_LIBVIRT_CALL_DEADLINE)));
    }
    Ok(d.into())
}

fn load_scenario(arg: &str) -> anyhow::Result<Scenario> {
    let path = PathBuf::from(arg);
    if path.exists() {
        return Ok(Scenario::from_file(&path)?);
    }
    scenario::builtin(arg).with_context(|| {
        let names: Vec<&str> = scenario::BUILTIN.iter().map(|(n, _)| *n).collect();
        format!("--scenario {arg:?}: no such file, and not a built-in scenario ({})", names.join(", "))
    })
}

/// One `--pin-allow` identity, trimmed. An empty one is refused: a `--pin-allow "$PINNERS"` that expanded to
/// nothing must not quietly fall back to the default identity.
fn parse_identity(s: &str) -> Result<String, String> {
    vcpu_balancer::flags::nonblank(s, "identity (a certificate CN or DNS name, e.g. vcpu-controller)")
}

/// Flags that only one backend reads, by clap id, with the flag and variable that set them.
const LIBVIRT_ONLY: &[(&str, &str, &str)] =
    &[("uri", "--uri", "VCPU_AGENT_URI"), ("libvirt_timeout", "--libvirt-timeout", "VCPU_AGENT_LIBVIRT_TIMEOUT")];
const SIM_ONLY: &[(&str, &str, &str)] =
    &[("scenario", "--scenario", "VCPU_AGENT_SCENARIO"), ("sim_hostname", "--sim-hostname", "VCPU_AGENT_SIM_HOSTNAME")];

/// Refuses a flag of the other backend given on the command line: it would be ignored, and whoever typed it expects
/// it to act. The same set in the environment (shared by a unit file, say) is only warned about.
fn check_other_backend(matches: &ArgMatches, backend: Option<Backend>) -> anyhow::Result<()> {
    let (others, wanted) = match backend {
        Some(Backend::Sim) => (LIBVIRT_ONLY, "--backend libvirt"),
        Some(Backend::Libvirt) => (SIM_ONLY, "--backend sim"),
        None => return Ok(()),
    };
    for &(id, flag, var) in others {
        match matches.value_source(id) {
            Some(ValueSource::CommandLine) => anyhow::bail!("{flag} only applies to {wanted}"),
            Some(ValueSource::EnvVariable) => tracing::warn!("{var} is set, but it only applies to {wanted}: ignored"),
            _ => {}
        }
    }
    Ok(())
}

async fn run(cli: Cli, matches: ArgMatches) -> anyhow::Result<()> {
    check_other_backend(&matches, cli.backend)?;
    let tls = TlsFiles::from_flags(cli.tls_cert.clone(), cli.tls_key.clone(), cli.tls_ca.clone())?;
    security::check_listen(cli.listen, tls.is_some(), cli.insecure)?;
    if !cli.pin_allow.is_empty() && tls.is_none() {
        anyhow::bail!("--pin-allow needs TLS: without client certificates there are no identities to allow");
    }
    let mut opts = ServeOptions {
        tls: tls.as_ref().map(TlsFiles::server_config).transpose()?,
        pins: PinPolicy::for_agent(tls.is_some(), &cli.pin_allow),
        metrics: None,
        ..ServeOptions::default()
    };
    if tls.is_none() {
        tracing::warn!(listen = %cli.listen, "serving plaintext: every client that reaches this port may pin");
    }
    if cli.sim_hosts > 1 || cli.listen_base.is_some() {
        if cli.backend != Some(Backend::Sim) {
            anyhow::bail!("--sim-hosts and --listen-base only apply to --backend sim");
        }
        if tls.is_some() {
            anyhow::bail!("a simulated fleet (--sim-hosts) serves plaintext only; drop the TLS flags");
        }
        if cli.metrics_listen.is_some() {
            anyhow::bail!("a simulated fleet (--sim-hosts) serves no metrics; drop --metrics-listen");
        }
        let sc = load_scenario(&cli.scenario)?;
        fleet::raise_fd_limit();
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            vcpu_balancer::shutdown::signal().await;
            s.cancel();
        });
        let base = cli.listen_base.unwrap_or(cli.listen.port());
        let n = usize::from(cli.sim_hosts);
        if base != 0 && usize::from(base) + n - 1 > usize::from(u16::MAX) {
            anyhow::bail!("--sim-hosts {n} from port {base} needs ports up to {}, past 65535", usize::from(base) + n - 1);
        }
        fleet::serve_sim_fleet(&sc, n, cli.listen.ip(), base, stop, |addrs| {
            let first = addrs.first().map(ToString::to_string).unwrap_or_default();
            let last = addrs.last().map(ToString::to_string).unwrap_or_default();
            tracing::info!(hosts = n, first = %first, last = %last, scenario = %cli.scenario, "simulated fleet listening");
        })
        .await?;
        tracing::info!("agent stopped");
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    opts.metrics = match cli.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
            let m = AgentMetrics::new();
            let router = vcpu_balancer::http::metrics_router(m.clone());
            tokio::spawn(vcpu_balancer::http::serve(l, router, vcpu_balancer::shutdown::signal()));
            Some(m)
        }
        None => None,
    };
    match cli.backend.context("--backend is required")? {
        Backend::Sim => {
            let sc = load_scenario(&cli.scenario)?;
            // The flag, else the scenario's own `hostname`, else this machine's.
            let name = cli.sim_hostname.or_else(|| sc.hostname.clone()).unwrap_or_else(|| {
                format!("sim-{}", hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default())
            });
            tracing::info!(scenario = %cli.scenario, pcpus = sc.pcpus, domains = sc.domains.len(), "simulated host");
            let hv = Arc::new(SimHypervisor::new(&sc, name, Arc::new(MonotonicClock::new())));
            serve_backend(hv, "sim", listener, opts).await?;
        }
        Backend::Libvirt => {
            #[cfg(feature = "libvirt")]
            {
                use vcpu_balancer::hypervisor::libvirt::{LibvirtHypervisor, LibvirtOptions};
                let options = LibvirtOptions { call_deadline: cli.libvirt_timeout.into(), ..LibvirtOptions::default() };
                let hv = Arc::new(LibvirtHypervisor::with_options(&cli.uri, options));
                tracing::info!(uri = %cli.uri, timeout = %cli.libvirt_timeout, "libvirt backend");
                serve_backend(hv, "libvirt", listener, opts).await?;
            }
            #[cfg(not(feature = "libvirt"))]
            anyhow::bail!(
                "this vcpu-agent was built without libvirt support, so --backend libvirt (uri {}) is unavailable; \
                 rebuild with `cargo build --release --features libvirt` (needs libvirt-dev and pkg-config)",
                cli.uri
            );
        }
    }
    tracing::info!("agent stopped");
    Ok(())
}

#[tokio::main]
async fn main() {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if cli.man || cli.completions.is_some() {
        let mut c = Cli::command();
        let mut out = std::io::stdout();
        match cli.completions {
            Some(shell) => clap_complete::generate(shell, &mut c, "vcpu-agent", &mut out),
            None => {
                if let Err(e) = clap_mangen::Man::new(c).render(&mut out) {
                    eprintln!("vcpu-agent: error: {e}");
                    std::process::exit(EX_USAGE);
                }
            }
        }
        return;
    }
    telemetry::init(cli.log_format, "info");
    if let Err(e) = run(cli, matches).await {
        eprintln!("vcpu-agent: error: {e:#}");
        std::process::exit(EX_USAGE);
    }
}
