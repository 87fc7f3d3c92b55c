//! The controller's config file (TOML, `vcpu-controller run --config FILE`). Every key is optional; flags and
//! their environment variables override the file. `SIGHUP` re-reads it and applies the host list (see
//! [`crate::controller::run_dynamic`]).
//!
//! ```toml
//! hosts = ["hv1:50151", "hv2"]      # agent addresses
//! interval = "2s"
//! rpc_timeout = "800ms"
//! dry_run = false
//! max_inflight = 256                # most RPCs in flight at once across all hosts
//! state_dir = "/var/lib/vcpu-balancer"  # the controller's own pins, kept across restarts
//! http_listen = "127.0.0.1:9180"    # status page and /api/state
//! metrics_listen = "0.0.0.0:9181"   # Prometheus /metrics
//! [policy]
//! name = "converge"                 # seed, guarded or converge
//! threshold = 10                    # points of one pCPU
//! exclude = ["db-*"]                # never move these domains (name glob or UUID)
//! reserve_pcpus = "0-1"             # never a target
//! override_manual = false           # move vCPUs someone else pinned
//! max_moves = 8                     # vCPUs moved per host and round at most (default: no limit)
//! [tls]                             # mutual TLS to the agents: all three or none
//! cert = "/etc/vcpu-balancer/controller.crt"
//! key = "/etc/vcpu-balancer/controller.key"
//! ca = "/etc/vcpu-balancer/ca.crt"
//! ```
//!
//! `guard = false` in `[policy]` is the older spelling of `name = "seed"`.
//!
//! Errors name the line: unknown keys, wrong types, bad durations, addresses, policy names or pCPU lists,
//! thresholds outside 0..=100, TLS paths that are not readable files.

use crate::hypervisor::sim::scenario::line_of;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::controller::client::normalize_address_for;
use crate::controller::policy::{Constraints, DomainMatcher, PolicyConfig, PolicyKind};
use crate::model::parse_cpu_list;
use crate::security::TlsFiles;

/// Shortest interval accepted: shorter ones measure mostly noise.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// The longest interval or deadline accepted: far beyond any sensible one, and small enough that the arithmetic on
/// it (backoff doubling, two deadlines per interval) cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The most RPCs in flight at once that may be asked for: far above any process's file limit, and under what
/// the semaphore that enforces it can hold.
pub const MAX_INFLIGHT_LIMIT: usize = 1 << 20;
/// Where the Debian package installs the config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vcpu-balancer/controller.toml";

/// A config file that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{origin}: line {line}: {message}")]
    Invalid { origin: String, line: usize, message: String },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
}

/// TLS file paths (all three or none, checked when the settings are resolved with the flags).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TlsPaths {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

/// A checked config file; `None` = not set in the file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControllerConfig {
    pub hosts: Option<Vec<String>>,
    pub interval: Option<Duration>,
    pub rpc_timeout: Option<Duration>,
    pub dry_run: Option<bool>,
    pub max_inflight: Option<usize>,
    pub state_dir: Option<PathBuf>,
    pub policy: Option<PolicyKind>,
    pub threshold: Option<f64>,
    pub exclude: Option<Vec<String>>,
    pub reserve_pcpus: Option<Vec<u32>>,
    pub override_manual: Option<bool>,
    pub max_moves: Option<std::num::NonZeroUsize>,
    pub http_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsPaths,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    hosts: Option<Spanned<Vec<Spanned<String>>>>,
    interval: Option<Spanned<String>>,
    rpc_timeout: Option<Spanned<String>>,
    dry_run: Option<bool>,
    max_inflight: Option<Spanned<i64>>,
    state_dir: Option<Spanned<String>>,
    http_listen: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    policy: Option<RawPolicy>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<Spanned<String>>,
    threshold: Option<Spanned<f64>>,
    guard: Option<Spanned<bool>>,
    exclude: Option<Vec<Spanned<String>>>,
    reserve_pcpus: Option<Spanned<String>>,
    override_manual: Option<bool>,
    max_moves: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
}

/// A duration such as `2s` or `500ms`, greater than zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 2s, 500ms)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    if d > MAX_DURATION {
        return Err(format!("must be at most {}", humantime::format_duration(MAX_DURATION)));
    }
    Ok(d)
}

/// The shortest RPC deadline accepted: under it even a loopback call (about 0.2 ms) on a busy machine fails, and
/// every round with it.
pub const MIN_RPC_TIMEOUT: Duration = Duration::from_millis(10);

/// `--rpc-timeout` / `rpc_timeout`: a duration from [`MIN_RPC_TIMEOUT`] to [`MAX_DURATION`].
pub fn parse_rpc_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_RPC_TIMEOUT {
        return Err(format!("must be at least {MIN_RPC_TIMEOUT:?}: every call would miss it"));
    }
    Ok(d)
}

/// The policy from `--no-guard` (`VCPU_NO_GUARD`), `--policy` (`VCPU_POLICY`) and the file's `name`. `--no-guard`
/// means `--policy seed`, so with another `--policy` which one was meant is unknown: refused. A switch that is set
/// but off (`VCPU_NO_GUARD=0`) is no `--no-guard` at all, which is why this is not left to clap's conflicts.
pub fn policy_kind(no_guard: bool, flag: Option<PolicyKind>, file: Option<PolicyKind>) -> Result<PolicyKind, String> {
    match (no_guard, flag) {
        (true, Some(k)) if k != PolicyKind::Seed => Err(format!(
            "--no-guard (VCPU_NO_GUARD) cannot be used with --policy {k} (VCPU_POLICY): it means --policy seed"
        )),
        (true, _) => Ok(PolicyKind::Seed),
        (false, f) => Ok(f.or(file).unwrap_or(crate::controller::policy::DEFAULT_POLICY)),
    }
}

/// `--max-inflight` / `max_inflight`: a whole number from 1 to [`MAX_INFLIGHT_LIMIT`].
pub fn check_max_inflight(n: i128) -> Result<usize, String> {
    match usize::try_from(n) {
        Ok(v) if (1..=MAX_INFLIGHT_LIMIT).contains(&v) => Ok(v),
        _ => Err(format!("must be a whole number from 1 to {MAX_INFLIGHT_LIMIT}")),
    }
}

/// A round interval: a duration of at least [`MIN_INTERVAL`].
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < MIN_INTERVAL {
        return Err(format!("must be at least {MIN_INTERVAL:?}"));
    }
    Ok(d)
}

/// A spread threshold in points of one pCPU, 0..=100.
pub fn check_threshold(t: f64) -> Result<f64, String> {
    if !(0.0..=100.0).contains(&t) {
        return Err("must be between 0 and 100 (points of one pCPU)".into());
    }
    Ok(t)
}

impl ControllerConfig {
    /// Reads and checks a config file.
    pub fn from_file(path: &Path) -> Result<ControllerConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Io { path: path.display().to_string(), error })?;
        ControllerConfig::parse(&text, &path.display().to_string())
    }

    /// Parses and checks config text; `origin` names it in errors (a file name).
    pub fn parse(text: &str, origin: &str) -> Result<ControllerConfig, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => {
                ConfigError::Invalid { origin: origin.to_string(), line: line_of(text, span), message: e.message().to_string() }
            }
            None => ConfigError::Parse { origin: origin.to_string(), message: e.to_string() },
        })?;
        let invalid = |span: Range<usize>, key: &str, message: String| ConfigError::Invalid {
            origin: origin.to_string(),
            line: line_of(text, span),
            message: format!("{key}: {message}"),
        };
        let mut cfg = ControllerConfig { dry_run: raw.dry_run, ..Default::default() };
        if let Some(hosts) = raw.hosts {
            let mut list = Vec::new();
            for h in hosts.into_inner() {
                // Plaintext or TLS is only known once the flags are merged in; the client checks the scheme then.
                normalize_address_for(h.get_ref(), false)
                    .or_else(|_| normalize_address_for(h.get_ref(), h.get_ref().starts_with("https://")))
                    .map_err(|e| invalid(h.span(), "hosts", e.message()))?;
                list.push(h.into_inner());
            }
            cfg.hosts = Some(list);
        }
        if let Some(i) = raw.interval {
            cfg.interval = Some(parse_interval(i.get_ref()).map_err(|m| invalid(i.span(), "interval", m))?);
        }
        if let Some(t) = raw.rpc_timeout {
            cfg.rpc_timeout = Some(parse_rpc_timeout(t.get_ref()).map_err(|m| invalid(t.span(), "rpc_timeout", m))?);
        }
        if let Some(n) = raw.max_inflight {
            cfg.max_inflight = Some(check_max_inflight(i128::from(*n.get_ref())).map_err(|m| invalid(n.span(), "max_inflight", m))?);
        }
        if let Some(d) = raw.state_dir {
            if d.get_ref().trim().is_empty() {
                return Err(invalid(d.span(), "state_dir", "must name a directory".into()));
            }
            cfg.state_dir = Some(PathBuf::from(d.into_inner()));
        }
        let addr = |s: Spanned<String>, key: &str| -> Result<SocketAddr, ConfigError> {
            s.get_ref().parse().map_err(|e| invalid(s.span(), key, format!("{e} (expected IP:PORT, e.g. 127.0.0.1:9180)")))
        };
        cfg.http_listen = raw.http_listen.map(|s| addr(s, "http_listen")).transpose()?;
        cfg.metrics_listen = raw.metrics_listen.map(|s| addr(s, "metrics_listen")).transpose()?;
        if let Some(p) = raw.policy {
            if let Some(t) = p.threshold {
                cfg.threshold = Some(check_threshold(*t.get_ref()).map_err(|m| invalid(t.span(), "threshold", m))?);
            }
            let name = match p.name {
                Some(n) => Some(n.get_ref().parse::<PolicyKind>().map_err(|m| invalid(n.span(), "name", m))?),
                None => None,
            };
            cfg.policy = match p.guard {
                // `guard = false` predates `name` and means exactly the literal rule, like `--no-guard`.
                Some(g) if !*g.get_ref() => {
                    if name.is_some_and(|k| k != PolicyKind::Seed) {
                        return Err(invalid(g.span(), "guard", "false means name = \"seed\", which contradicts name".into()));
                    }
                    Some(PolicyKind::Seed)
                }
                _ => name,
            };
            if let Some(list) = p.exclude {
                let mut v = Vec::new();
                for e in list {
                    if e.get_ref().trim().is_empty() {
                        return Err(invalid(e.span(), "exclude", "empty pattern".into()));
                    }
                    // A stray space would make a glob that matches nothing, and protect nothing.
                    v.push(e.into_inner().trim().to_string());
                }
                cfg.exclude = Some(v);
            }
            if let Some(r) = p.reserve_pcpus {
                cfg.reserve_pcpus = Some(parse_cpu_list(r.get_ref()).map_err(|m| invalid(r.span(), "reserve_pcpus", m))?);
            }
            cfg.override_manual = p.override_manual;
            if let Some(n) = p.max_moves {
                let v = usize::try_from(*n.get_ref()).ok().and_then(std::num::NonZeroUsize::new);
                cfg.max_moves = Some(v.ok_or_else(|| {
                    invalid(n.span(), "max_moves", "must be a whole number greater than zero (to move nothing, use dry_run)".into())
                })?);
            }
        }
        if let Some(t) = raw.tls {
            // Checked here so the error names the line; whether all three are given is checked with the flags.
            let path = |s: Spanned<String>, key: &str| -> Result<PathBuf, ConfigError> {
                let p = PathBuf::from(s.get_ref());
                if !p.is_file() {
                    return Err(invalid(s.span(), key, format!("{} is not a readable file", p.display())));
                }
                Ok(p)
            };
            cfg.tls = TlsPaths {
                cert: t.cert.map(|s| path(s, "tls.cert")).transpose()?,
                key: t.key.map(|s| path(s, "tls.key")).transpose()?,
                ca: t.ca.map(|s| path(s, "tls.ca")).transpose()?,
            };
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, "x").unwrap();
        let text = format!(
            "hosts = [\"hv1\", \"hv2:7000\", \"https://hv3\"]\ninterval = \"500ms\"\nrpc_timeout = \"200ms\"\n\
             dry_run = true\nmax_inflight = 32\nstate_dir = \"/var/lib/vcpu-balancer\"\nhttp_listen = \"127.0.0.1:9180\"\nmetrics_listen = \"[::1]:9181\"\n\
             [policy]\nname = \"guarded\"\nthreshold = 12.5\nexclude = [\"db-*\"]\nreserve_pcpus = \"0-1,4\"\n\
             override_manual = true\nmax_moves = 4\n[tls]\nca = {:?}\n",
            ca.display().to_string()
        );
        let c = ControllerConfig::parse(&text, "c.toml").unwrap();
        assert_eq!(c.hosts, Some(vec!["hv1".to_string(), "hv2:7000".to_string(), "https://hv3".to_string()]));
        assert_eq!(c.interval, Some(Duration::from_millis(500)));
        assert_eq!(c.rpc_timeout, Some(Duration::from_millis(200)));
        assert_eq!(c.dry_run, Some(true));
        assert_eq!(c.max_inflight, Some(32));
        assert_eq!(c.state_dir, Some(PathBuf::from("/var/lib/vcpu-balancer")));
        assert_eq!(c.policy, Some(PolicyKind::Guarded));
        assert_eq!(c.threshold, Some(12.5));
        assert_eq!(c.exclude, Some(vec!["db-*".to_string()]));
        assert_eq!(c.reserve_pcpus, Some(vec![0, 1, 4]));
        assert_eq!(c.override_manual, Some(true));
        assert_eq!(c.max_moves, std::num::NonZeroUsize::new(4));
        assert_eq!(c.http_listen, Some("127.0.0.1:9180".parse().unwrap()));
        assert_eq!(c.metrics_listen, Some("[::1]:9181".parse().unwrap()));
        assert_eq!(c.tls.ca, Some(ca));
        assert_eq!(ControllerConfig::parse("", "e").unwrap(), ControllerConfig::default());
        // The older `guard = false` is the seed policy.
        let c = ControllerConfig::parse("[policy]\nguard = false\n", "c").unwrap();
        assert_eq!(c.policy, Some(PolicyKind::Seed));
        assert_eq!(ControllerConfig::parse("[policy]\nguard = true\n", "c").unwrap().policy, None);
    }

    /// The packaged config file parses, and so does every key it shows commented out, once uncommented (the TLS
    /// table aside: its paths must name files that exist).
    #[test]
    fn the_packaged_file_and_its_commented_keys_parse() {
        let text = include_str!("../../packaging/controller.toml");
        let c = ControllerConfig::parse(text, "packaging/controller.toml").unwrap();
        assert_eq!(c.policy, Some(PolicyKind::Converge));
        let body = text.split("# Mutual TLS").next().unwrap();
        let key = |l: &str| l.strip_prefix("# ").filter(|r| r.split(' ').nth(1) == Some("=")).map(str::to_string);
        let uncommented: Vec<String> = body.lines().map(|l| key(l).unwrap_or_else(|| l.to_string())).collect();
        let shown = body.lines().filter_map(key).count();
        assert!(shown >= 7, "{shown} commented keys");
        let c = ControllerConfig::parse(&uncommented.join("\n"), "uncommented").unwrap();
        assert_eq!(c.max_moves, std::num::NonZeroUsize::new(8));
        assert_eq!(c.reserve_pcpus, Some(vec![0, 1]));
        assert_eq!(c.max_inflight, Some(256));
    }

    #[test]
    fn errors_name_the_line() {
        for (text, line, needle) in [
            ("hosts = [\"a\"]\n\ninterval = \"10ms\"\n", 3, "at least"),
            ("hosts = [\"a\",\n  \"h:99999\"]\n", 2, "invalid port"),
            ("[policy]\nthreshold = 150\n", 2, "between 0 and 100"),
            ("hosts = [\"a\"]\nintervall = \"2s\"\n", 2, "unknown field"),
            ("interval = 2\n", 1, "invalid type"),
            ("http_listen = \"localhost\"\n", 1, "http_listen"),
            ("[tls]\ncert = \"/nonexistent/c.crt\"\n", 2, "not a readable file"),
            ("[policy]\nname = \"fastest\"\n", 2, "unknown policy"),
            ("[policy]\nname = \"converge\"\nguard = false\n", 3, "contradicts"),
            ("[policy]\nreserve_pcpus = \"3-1\"\n", 2, "reserve_pcpus"),
            ("max_inflight = 0\n", 1, "from 1 to"),
            ("max_inflight = 9223372036854775807\n", 1, "from 1 to"),
            ("rpc_timeout = \"300000000000y\"\n", 1, "at most 1day"),
            ("rpc_timeout = \"1ns\"\n", 1, "at least 10ms"),
            ("[policy]\n\nmax_moves = 0\n", 3, "use dry_run"),
            ("[policy]\nmax_moves = -2\n", 2, "max_moves"),
            ("hosts = [\"a\"]\nstate_dir = \" \"\n", 2, "must name a directory"),
        ] {
            match ControllerConfig::parse(text, "c.toml") {
                Err(ConfigError::Invalid { line: l, message, .. }) => {
                    assert_eq!(l, line, "{text:?}: {message}");
                    assert!(message.contains(needle), "{text:?}: {message}");
                }
                other => panic!("{text:?} gave {other:?}"),
            }
        }
    }
}

/// What the command line (flags and their environment variables) gave; `None`/empty = not given.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub hosts: Vec<String>,
    pub interval: Option<Duration>,
    pub rpc_timeout: Option<Duration>,
    pub max_inflight: Option<usize>,
    /// `--state-dir`: replaces the file's.
    pub state_dir: Option<PathBuf>,
    pub policy: Option<PolicyKind>,
    pub threshold: Option<f64>,
    /// `--no-guard` (the older `--policy seed`) can only select the literal rule.
    pub no_guard: bool,
    /// `--exclude`: replaces the file's list when given.
    pub exclude: Vec<String>,
    pub reserve_pcpus: Option<Vec<u32>>,
    /// `--override-manual` can only turn it on.
    pub override_manual: bool,
    pub max_moves: Option<std::num::NonZeroUsize>,
    /// `--dry-run` can only turn dry-run on.
    pub dry_run: bool,
    pub http_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// `--tls-cert`, `--tls-key`, `--tls-ca`: each replaces the file's.
    pub tls: TlsPaths,
}

/// The settings `run` uses: flags over the file over the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    pub hosts: Vec<String>,
    /// True when the hosts came from the command line: a reload then keeps them.
    pub hosts_from_flags: bool,
    pub interval: Duration,
    pub rpc_timeout: Duration,
    pub max_inflight: usize,
    /// Where the controller keeps its own pins across restarts; `None` = in memory only.
    pub state_dir: Option<PathBuf>,
    pub policy: PolicyConfig,
    pub dry_run: bool,
    pub http_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    /// Mutual TLS to the agents; `None` = plaintext.
    pub tls: Option<TlsFiles>,
}

impl RunSettings {
    /// Merges `flags` over `file` over the defaults. Fails when no host is given anywhere, or when TLS is given
    /// only in part.
    pub fn resolve(flags: &Overrides, file: &ControllerConfig) -> Result<RunSettings, String> {
        let hosts_from_flags = !flags.hosts.is_empty();
        let hosts = if hosts_from_flags { flags.hosts.clone() } else { file.hosts.clone().unwrap_or_default() };
        if hosts.is_empty() {
            return Err("no host to balance: give --host (or VCPU_HOSTS) or `hosts` in the config file".into());
        }
        let kind = policy_kind(flags.no_guard, flags.policy, file.policy)?;
        let exclude = if flags.exclude.is_empty() { file.exclude.clone().unwrap_or_default() } else { flags.exclude.clone() };
        let constraints = Constraints {
            exclude: exclude.iter().map(|e| DomainMatcher::parse(e)).collect(),
            reserved: flags.reserve_pcpus.clone().or_else(|| file.reserve_pcpus.clone()).unwrap_or_default(),
            override_manual: flags.override_manual || file.override_manual.unwrap_or(false),
            max_moves: flags.max_moves.or(file.max_moves),
        };
        let tls = match (
            flags.tls.cert.clone().or_else(|| file.tls.cert.clone()),
            flags.tls.key.clone().or_else(|| file.tls.key.clone()),
            flags.tls.ca.clone().or_else(|| file.tls.ca.clone()),
        ) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles { cert, key, ca }),
            (c, k, a) => {
                let missing: Vec<&str> = [("cert", c.is_none()), ("key", k.is_none()), ("ca", a.is_none())]
                    .into_iter()
                    .filter_map(|(n, m)| m.then_some(n))
                    .collect();
                return Err(format!(
                    "TLS needs all three of cert, key and ca (--tls-cert/--tls-key/--tls-ca or [tls] in the config \
                     file); missing: {}",
                    missing.join(", ")
                ));
            }
        };
        Ok(RunSettings {
            hosts,
            hosts_from_flags,
            interval: flags.interval.or(file.interval).unwrap_or(crate::controller::host::DEFAULT_INTERVAL),
            rpc_timeout: flags
                .rpc_timeout
                .or(file.rpc_timeout)
                .unwrap_or(crate::controller::client::DEFAULT_RPC_TIMEOUT),
            max_inflight: flags
                .max_inflight
                .or(file.max_inflight)
                .unwrap_or(crate::controller::host::DEFAULT_MAX_INFLIGHT),
            state_dir: flags.state_dir.clone().or_else(|| file.state_dir.clone()),
            policy: PolicyConfig {
                kind,
                threshold: flags
                    .threshold
                    .or(file.threshold)
                    .unwrap_or(crate::controller::policy::DEFAULT_THRESHOLD),
                constraints,
            },
            dry_run: flags.dry_run || file.dry_run.unwrap_or(false),
            http_listen: flags.http_listen.or(file.http_listen),
            metrics_listen: flags.metrics_listen.or(file.metrics_listen),
            tls,
        })
    }

    /// Re-reads `path` for a reload: the new host list, or `None` when the hosts come from the command line.
    /// Settings other than the host list need a restart; a changed one is logged so the operator knows.
    /// The settings, other than the host list, in which `new` differs from `self`, by their names in the file.
    pub fn changed_settings(&self, new: &RunSettings) -> Vec<&'static str> {
        let (a, b) = (&self.policy, &new.policy);
        let (ca, cb) = (&a.constraints, &b.constraints);
        [
            ("interval", self.interval != new.interval),
            ("rpc_timeout", self.rpc_timeout != new.rpc_timeout),
            ("max_inflight", self.max_inflight != new.max_inflight),
            ("state_dir", self.state_dir != new.state_dir),
            ("dry_run", self.dry_run != new.dry_run),
            ("http_listen", self.http_listen != new.http_listen),
            ("metrics_listen", self.metrics_listen != new.metrics_listen),
            ("tls", self.tls != new.tls),
            ("policy.name", a.kind != b.kind),
            ("policy.threshold", a.threshold != b.threshold),
            ("policy.exclude", ca.exclude != cb.exclude),
            ("policy.reserve_pcpus", ca.reserved != cb.reserved),
            ("policy.override_manual", ca.override_manual != cb.override_manual),
            ("policy.max_moves", ca.max_moves != cb.max_moves),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    pub fn reload(&self, flags: &Overrides, path: &Path) -> Result<Option<Vec<String>>, ConfigError> {
        let file = ControllerConfig::from_file(path)?;
        let new = RunSettings::resolve(flags, &file).map_err(|message| ConfigError::Parse {
            origin: path.display().to_string(),
            message,
        })?;
        let mut pending = self.changed_settings(&new);
        // A setting added to RunSettings but not to `changed_settings` is still reported, if without its name.
        if pending.is_empty() && (RunSettings { hosts: self.hosts.clone(), ..new.clone() }) != *self {
            pending.push("other settings");
        }
        if !pending.is_empty() {
            tracing::warn!(config = %path.display(), settings = %pending.join(", "),
                "only the host list is applied on reload; these changed settings take effect at the next restart");
        }
        if self.hosts_from_flags {
            tracing::warn!(config = %path.display(), "hosts are given on the command line; the file's hosts are ignored");
            return Ok(None);
        }
        Ok(Some(new.hosts))
    }
}

/// Takes over SIGHUP for this process: from now on one is queued for [`reload_on_sighup`] instead of ending it.
pub fn hangup_signal() -> std::io::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
}

/// Re-reads the config file on every SIGHUP and sends the new host list on `tx`. An invalid file is refused (the
/// error names the line) and the current hosts keep running. Without a config file, SIGHUP is logged and ignored
/// rather than killing the controller (SIGHUP's default action). `hup` is made by the caller as early as it can
/// ([`hangup_signal`]): until it exists, a SIGHUP (a `systemctl reload` right after `start`) kills the process.
pub async fn reload_on_sighup(
    mut hup: tokio::signal::unix::Signal,
    current: RunSettings,
    flags: Overrides,
    path: Option<PathBuf>,
    tx: tokio::sync::mpsc::Sender<Vec<String>>,
) -> std::io::Result<()> {
    let mut current = current;
    while hup.recv().await.is_some() {
        let Some(path) = &path else {
            tracing::warn!(signal = "SIGHUP", "no --config file to reload; ignored");
            continue;
        };
        tracing::info!(signal = "SIGHUP", config = %path.display(), "reloading the config file");
        match current.reload(&flags, path) {
            Ok(Some(hosts)) => {
                current.hosts.clone_from(&hosts);
                if tx.send(hosts).await.is_err() {
                    break;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "reload refused; the current hosts keep running"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod merge_tests {
    use super::*;

    #[test]
    fn no_guard_means_seed_and_conflicts_only_with_another_policy() {
        use PolicyKind::{Converge, Guarded, Seed};
        assert_eq!(policy_kind(false, None, None), Ok(crate::controller::policy::DEFAULT_POLICY));
        assert_eq!(policy_kind(false, None, Some(Guarded)), Ok(Guarded));
        assert_eq!(policy_kind(false, Some(Seed), Some(Guarded)), Ok(Seed));
        assert_eq!(policy_kind(true, None, Some(Converge)), Ok(Seed));
        assert_eq!(policy_kind(true, Some(Seed), None), Ok(Seed));
        assert!(policy_kind(true, Some(Converge), None).unwrap_err().contains("cannot be used with --policy converge"));
    }

    /// A reload names what it did not apply, so the operator knows what waits for a restart.
    #[test]
    fn a_reload_names_the_settings_it_leaves_for_a_restart() {
        let settings = |text: &str| {
            RunSettings::resolve(&Overrides::default(), &ControllerConfig::parse(text, "c").unwrap()).unwrap()
        };
        let old = settings("hosts = [\"a\"]\n[policy]\nthreshold = 10\n");
        let more_hosts = settings("hosts = [\"a\", \"b\"]\n[policy]\nthreshold = 10\n");
        assert_eq!(old.changed_settings(&more_hosts), Vec::<&str>::new());
        let new = settings(
            "hosts = [\"b\"]\ninterval = \"5s\"\n[policy]\nthreshold = 20\nname = \"seed\"\nexclude = [\"db-*\"]\n",
        );
        assert_eq!(old.changed_settings(&new), ["interval", "policy.name", "policy.threshold", "policy.exclude"]);
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file = ControllerConfig::parse(
            "hosts = [\"a\", \"b\"]\ninterval = \"5s\"\n[policy]\nthreshold = 20\nguard = false\nexclude = [\"db-*\"]\n",
            "c",
        )
        .unwrap();
        let s = RunSettings::resolve(&Overrides::default(), &file).unwrap();
        assert_eq!(s.hosts, vec!["a", "b"]);
        assert!(!s.hosts_from_flags);
        assert_eq!(s.interval, Duration::from_secs(5));
        assert_eq!(s.policy.threshold, 20.0);
        assert_eq!(s.policy.kind, PolicyKind::Seed);
        assert_eq!(s.policy.constraints.exclude, vec![DomainMatcher::parse("db-*")]);
        assert_eq!(s.rpc_timeout, crate::controller::client::DEFAULT_RPC_TIMEOUT);
        assert_eq!(s.max_inflight, crate::controller::host::DEFAULT_MAX_INFLIGHT);
        assert_eq!(s.tls, None);
        let flags = Overrides {
            hosts: vec!["c".into()],
            interval: Some(Duration::from_secs(1)),
            threshold: Some(5.0),
            exclude: vec!["web-*".into()],
            ..Default::default()
        };
        let s = RunSettings::resolve(&flags, &file).unwrap();
        assert_eq!(s.hosts, vec!["c"]);
        assert!(s.hosts_from_flags);
        assert_eq!(s.interval, Duration::from_secs(1));
        assert_eq!(s.policy.threshold, 5.0);
        assert_eq!(s.policy.constraints.exclude, vec![DomainMatcher::parse("web-*")]);
        assert!(RunSettings::resolve(&Overrides::default(), &ControllerConfig::default()).is_err());
        // Without guard = false the default policy applies; --policy overrides the file's name.
        let file = ControllerConfig::parse("hosts = [\"a\"]\n[policy]\nname = \"guarded\"\n", "c").unwrap();
        assert_eq!(RunSettings::resolve(&Overrides::default(), &file).unwrap().policy.kind, PolicyKind::Guarded);
        let flags = Overrides { policy: Some(PolicyKind::Converge), ..Default::default() };
        assert_eq!(RunSettings::resolve(&flags, &file).unwrap().policy.kind, PolicyKind::Converge);
        // --max-moves over the file's, which is over no limit.
        assert_eq!(RunSettings::resolve(&flags, &file).unwrap().policy.constraints.max_moves, None);
        let file = ControllerConfig::parse("hosts = [\"a\"]\n[policy]\nmax_moves = 3\n", "c").unwrap();
        let three = std::num::NonZeroUsize::new(3);
        assert_eq!(RunSettings::resolve(&Overrides::default(), &file).unwrap().policy.constraints.max_moves, three);
        let flags = Overrides { max_moves: std::num::NonZeroUsize::new(1), ..Default::default() };
        assert_eq!(
            RunSettings::resolve(&flags, &file).unwrap().policy.constraints.max_moves,
            std::num::NonZeroUsize::new(1)
        );
    }

    #[test]
    fn tls_flags_override_the_file_and_all_three_are_needed() {
        let file = ControllerConfig {
            hosts: Some(vec!["a".into()]),
            tls: TlsPaths { cert: Some("f.crt".into()), key: Some("f.key".into()), ca: Some("f-ca.crt".into()) },
            ..Default::default()
        };
        let s = RunSettings::resolve(&Overrides::default(), &file).unwrap();
        assert_eq!(s.tls, Some(TlsFiles { cert: "f.crt".into(), key: "f.key".into(), ca: "f-ca.crt".into() }));
        let flags = Overrides { tls: TlsPaths { cert: Some("x.crt".into()), ..Default::default() }, ..Default::default() };
        assert_eq!(RunSettings::resolve(&flags, &file).unwrap().tls.unwrap().cert, PathBuf::from("x.crt"));
        let partial = ControllerConfig { tls: TlsPaths { ca: None, ..file.tls.clone() }, ..file };
        let e = RunSettings::resolve(&Overrides::default(), &partial).unwrap_err();
        assert!(e.contains("missing: ca"), "{e}");
    }

    #[test]
    fn reload_gives_the_new_hosts_and_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "hosts = [\"a\"]\n").unwrap();
        let flags = Overrides::default();
        let s = RunSettings::resolve(&flags, &ControllerConfig::from_file(&path).unwrap()).unwrap();
        std::fs::write(&path, "hosts = [\"a\", \"b\"]\n").unwrap();
        assert_eq!(s.reload(&flags, &path).unwrap(), Some(vec!["a".to_string(), "b".to_string()]));
        std::fs::write(&path, "hosts = [\"a\",\n \"b:x\"]\n").unwrap();
        let e = s.reload(&flags, &path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        let pinned = Overrides { hosts: vec!["z".into()], ..Default::default() };
        let s = RunSettings::resolve(&pinned, &ControllerConfig::default()).unwrap();
        std::fs::write(&path, "hosts = [\"a\"]\n").unwrap();
        assert_eq!(s.reload(&pinned, &path).unwrap(), None);
    }
}
