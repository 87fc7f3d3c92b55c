//! The controller's config file (TOML, `vcpu-controller run --config FILE`). Every key is optional; flags and
//! their environment variables override the file. `SIGHUP` re-reads it and applies the host list (see
//! [`crate::controller::run_dynamic`]).
//!
//! ```toml
//! hosts = ["hv1:50151", "hv2"]      # agent addresses
//! interval = "2s"
//! rpc_timeout = "800ms"
//! dry_run = false
//! http_listen = "127.0.0.1:9180"    # status page and /api/state
//! metrics_listen = "0.0.0.0:9181"   # Prometheus /metrics
//! [policy]
//! threshold = 10                    # points of one pCPU
//! guard = true
//! [tls]                             # used when TLS support lands; checked to be readable files now
//! cert = "/etc/vcpu-balancer/controller.crt"
//! key = "/etc/vcpu-balancer/controller.key"
//! ca = "/etc/vcpu-balancer/ca.crt"
//! ```
//!
//! Errors name the line: unknown keys, wrong types, bad durations or addresses, thresholds outside 0..=100.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::controller::client::normalize_address;

/// Shortest interval accepted: shorter ones measure mostly noise.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
/// Where the Debian package installs the config file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vcpu-balancer/controller.toml";

/// A config file that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{origin}: line {line}: {message}")]
    Invalid { origin: String, line: usize, message: String },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
}

/// TLS file paths, passed through for the TLS support being built separately.
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
    pub threshold: Option<f64>,
    pub guard: Option<bool>,
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
    http_listen: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    policy: Option<RawPolicy>,
    tls: Option<RawTls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    threshold: Option<Spanned<f64>>,
    guard: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
}

fn line_of(text: &str, span: Range<usize>) -> usize {
    text[..span.start.min(text.len())].matches('\n').count() + 1
}

/// A duration such as `2s` or `500ms`, greater than zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 2s, 500ms)"))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
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
            .map_err(|source| ConfigError::Io { path: path.display().to_string(), source })?;
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
                normalize_address(h.get_ref()).map_err(|e| invalid(h.span(), "hosts", e.message()))?;
                list.push(h.into_inner());
            }
            cfg.hosts = Some(list);
        }
        if let Some(i) = raw.interval {
            cfg.interval = Some(parse_interval(i.get_ref()).map_err(|m| invalid(i.span(), "interval", m))?);
        }
        if let Some(t) = raw.rpc_timeout {
            cfg.rpc_timeout = Some(parse_duration(t.get_ref()).map_err(|m| invalid(t.span(), "rpc_timeout", m))?);
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
            cfg.guard = p.guard;
        }
        if let Some(t) = raw.tls {
            // TLS is not wired yet; checking the paths now means a typo is found before TLS depends on it.
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
            "hosts = [\"hv1\", \"hv2:7000\"]\ninterval = \"500ms\"\nrpc_timeout = \"200ms\"\ndry_run = true\n\
             http_listen = \"127.0.0.1:9180\"\nmetrics_listen = \"[::1]:9181\"\n[policy]\nthreshold = 12.5\nguard = false\n\
             [tls]\nca = {:?}\n",
            ca.display().to_string()
        );
        let c = ControllerConfig::parse(&text, "c.toml").unwrap();
        assert_eq!(c.hosts, Some(vec!["hv1".to_string(), "hv2:7000".to_string()]));
        assert_eq!(c.interval, Some(Duration::from_millis(500)));
        assert_eq!(c.rpc_timeout, Some(Duration::from_millis(200)));
        assert_eq!(c.dry_run, Some(true));
        assert_eq!(c.threshold, Some(12.5));
        assert_eq!(c.guard, Some(false));
        assert_eq!(c.http_listen, Some("127.0.0.1:9180".parse().unwrap()));
        assert_eq!(c.metrics_listen, Some("[::1]:9181".parse().unwrap()));
        assert_eq!(c.tls.ca, Some(ca));
        assert_eq!(ControllerConfig::parse("", "e").unwrap(), ControllerConfig::default());
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
    pub threshold: Option<f64>,
    /// `--no-guard` can only turn the guard off.
    pub no_guard: bool,
    /// `--dry-run` can only turn dry-run on.
    pub dry_run: bool,
    pub http_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
}

/// The settings `run` uses: flags over the file over the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSettings {
    pub hosts: Vec<String>,
    /// True when the hosts came from the command line: a reload then keeps them.
    pub hosts_from_flags: bool,
    pub interval: Duration,
    pub rpc_timeout: Duration,
    pub policy: crate::controller::policy::PolicyConfig,
    pub dry_run: bool,
    pub http_listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub tls: TlsPaths,
}

impl RunSettings {
    /// Merges `flags` over `file` over the defaults. Fails when no host is given anywhere.
    pub fn resolve(flags: &Overrides, file: &ControllerConfig) -> Result<RunSettings, String> {
        let hosts_from_flags = !flags.hosts.is_empty();
        let hosts = if hosts_from_flags { flags.hosts.clone() } else { file.hosts.clone().unwrap_or_default() };
        if hosts.is_empty() {
            return Err("no host to balance: give --host (or VCPU_HOSTS) or `hosts` in the config file".into());
        }
        Ok(RunSettings {
            hosts,
            hosts_from_flags,
            interval: flags.interval.or(file.interval).unwrap_or(crate::controller::host::DEFAULT_INTERVAL),
            rpc_timeout: flags
                .rpc_timeout
                .or(file.rpc_timeout)
                .unwrap_or(crate::controller::client::DEFAULT_RPC_TIMEOUT),
            policy: crate::controller::policy::PolicyConfig {
                threshold: flags
                    .threshold
                    .or(file.threshold)
                    .unwrap_or(crate::controller::policy::DEFAULT_THRESHOLD),
                guard: !flags.no_guard && file.guard.unwrap_or(true),
            },
            dry_run: flags.dry_run || file.dry_run.unwrap_or(false),
            http_listen: flags.http_listen.or(file.http_listen),
            metrics_listen: flags.metrics_listen.or(file.metrics_listen),
            tls: file.tls.clone(),
        })
    }

    /// Re-reads `path` for a reload: the new host list, or `None` when the hosts come from the command line.
    /// Settings other than the host list need a restart; a changed one is logged so the operator knows.
    pub fn reload(&self, flags: &Overrides, path: &Path) -> Result<Option<Vec<String>>, ConfigError> {
        let file = ControllerConfig::from_file(path)?;
        let new = RunSettings::resolve(flags, &file).map_err(|message| ConfigError::Parse {
            origin: path.display().to_string(),
            message,
        })?;
        let same_but_hosts = RunSettings { hosts: self.hosts.clone(), ..new.clone() };
        if &same_but_hosts != self {
            tracing::warn!(config = %path.display(),
                "only the host list is applied on reload; other changed settings take effect at the next restart");
        }
        if self.hosts_from_flags {
            tracing::warn!(config = %path.display(), "hosts are given on the command line; the file's hosts are ignored");
            return Ok(None);
        }
        Ok(Some(new.hosts))
    }
}

/// Re-reads the config file on every SIGHUP and sends the new host list on `tx`. An invalid file is refused (the
/// error names the line) and the current hosts keep running. Without a config file, SIGHUP is logged and ignored
/// rather than killing the controller (SIGHUP's default action).
pub async fn reload_on_sighup(
    current: RunSettings,
    flags: Overrides,
    path: Option<PathBuf>,
    tx: tokio::sync::mpsc::Sender<Vec<String>>,
) -> std::io::Result<()> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
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
    fn flags_override_the_file_which_overrides_defaults() {
        let file = ControllerConfig::parse(
            "hosts = [\"a\", \"b\"]\ninterval = \"5s\"\n[policy]\nthreshold = 20\nguard = false\n",
            "c",
        )
        .unwrap();
        let s = RunSettings::resolve(&Overrides::default(), &file).unwrap();
        assert_eq!(s.hosts, vec!["a", "b"]);
        assert!(!s.hosts_from_flags);
        assert_eq!(s.interval, Duration::from_secs(5));
        assert_eq!(s.policy.threshold, 20.0);
        assert!(!s.policy.guard);
        assert_eq!(s.rpc_timeout, crate::controller::client::DEFAULT_RPC_TIMEOUT);
        let flags = Overrides {
            hosts: vec!["c".into()],
            interval: Some(Duration::from_secs(1)),
            threshold: Some(5.0),
            ..Default::default()
        };
        let s = RunSettings::resolve(&flags, &file).unwrap();
        assert_eq!(s.hosts, vec!["c"]);
        assert!(s.hosts_from_flags);
        assert_eq!(s.interval, Duration::from_secs(1));
        assert_eq!(s.policy.threshold, 5.0);
        assert!(RunSettings::resolve(&Overrides::default(), &ControllerConfig::default()).is_err());
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
