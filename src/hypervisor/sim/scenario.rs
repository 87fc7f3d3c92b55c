//! The simulator's scenario file (TOML): a host's pCPUs and its domains with their load over time.
//!
//! ```toml
//! pcpus = 4
//! [[domain]]
//! name = "vm1"
//! vcpus = 1                 # default 1
//! affinity = [0]            # initial pinning; omitted = all pCPUs
//! load = 100                # constant demand, % of one pCPU per vCPU
//! # or, instead of load, a cycle that repeats:
//! # phases = [ { load = 100, secs = 20 }, { load = 10, secs = 20 } ]
//! ```
//!
//! Two optional top-level keys make bigger or harder hosts reproducible from a seed:
//! - `random = { seed = 7, vcpus = 200, min = 5, max = 40 }` adds `vcpus` one-vCPU domains `r000`, `r001`, ...
//!   with constant loads drawn uniformly in `min..=max`, each pinned to a pCPU drawn uniformly.
//! - `noise = 5` perturbs every sample: each vCPU's time increment since the previous sample is changed by up to
//!   ±5 points of the window (uniform, zero-mean, seeded by `seed`, default 0), never below 0, so that measured
//!   usage is noisy the way real counters read over short windows are.
//!
//! Errors name the line: unknown keys, loads outside 0..=100, affinities naming pCPUs the host does not have.

use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::hypervisor::sim::rng::SplitMix64;
use crate::model::PcpuId;

/// Most pCPUs a simulated host may have.
pub const MAX_SIM_PCPUS: u32 = 4096;
/// Most vCPUs one simulated domain may have.
pub const MAX_SIM_VCPUS: u32 = 1024;

/// A scenario that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{origin}: line {line}: {message}")]
    Invalid { origin: String, line: usize, message: String },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
}

/// Demand of one vCPU over time, in % of one pCPU.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadProfile {
    Constant(f64),
    /// `(load %, seconds)` phases, repeated in a cycle.
    Phases(Vec<(f64, f64)>),
}

impl LoadProfile {
    /// Demand at `t` seconds after the domain started, and how long (seconds) it stays so; `None` = forever.
    pub fn at(&self, t: f64) -> (f64, Option<f64>) {
        match self {
            LoadProfile::Constant(l) => (*l, None),
            LoadProfile::Phases(ph) => {
                let cycle: f64 = ph.iter().map(|p| p.1).sum();
                let mut pos = t.rem_euclid(cycle);
                for &(load, secs) in ph {
                    if pos < secs {
                        return (load, Some(secs - pos));
                    }
                    pos -= secs;
                }
                // Rounding put us at the very end of the cycle: the first phase starts now.
                (ph[0].0, Some(ph[0].1))
            }
        }
    }
}

/// One domain of a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainSpec {
    pub name: String,
    pub uuid: Option<String>,
    pub vcpus: u32,
    /// Initial affinity; `None` = all pCPUs.
    pub affinity: Option<Vec<PcpuId>>,
    pub load: LoadProfile,
}

/// A simulated host.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub pcpus: u32,
    pub hostname: Option<String>,
    pub domains: Vec<DomainSpec>,
    /// Measurement noise, in points of one pCPU per sample window (0 = exact).
    pub noise: f64,
    /// Seed of the measurement noise.
    pub seed: u64,
}

/// Most measurement noise a scenario may ask for, in points.
pub const MAX_NOISE: f64 = 50.0;
/// Bounds of one load phase, in seconds: the model steps through phases one by one, so a phase too short would
/// make a sample take forever, and one too long would overflow the nanosecond clock.
pub const MIN_PHASE_SECS: f64 = 0.001;
pub const MAX_PHASE_SECS: f64 = 365.0 * 24.0 * 3600.0;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    pcpus: Spanned<u32>,
    hostname: Option<String>,
    noise: Option<Spanned<f64>>,
    seed: Option<u64>,
    random: Option<Spanned<RawRandom>>,
    #[serde(default)]
    domain: Vec<Spanned<RawDomain>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRandom {
    seed: u64,
    vcpus: u32,
    min: f64,
    max: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDomain {
    name: Spanned<String>,
    uuid: Option<Spanned<String>>,
    vcpus: Option<Spanned<u32>>,
    affinity: Option<Spanned<Vec<Spanned<u32>>>>,
    load: Option<Spanned<f64>>,
    phases: Option<Spanned<Vec<Spanned<RawPhase>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPhase {
    load: Spanned<f64>,
    secs: Spanned<f64>,
}

/// The 1-based line of `text` where `span` starts: how TOML errors name their place for operators.
pub(crate) fn line_of(text: &str, span: Range<usize>) -> usize {
    text[..span.start.min(text.len())].matches('\n').count() + 1
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn from_file(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ScenarioError::Io { path: path.display().to_string(), error })?;
        Scenario::parse(&text, &path.display().to_string())
    }

    /// Parses and checks scenario text; `origin` names it in errors (a file name).
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let raw: RawScenario = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => ScenarioError::Invalid {
                origin: origin.to_string(),
                line: line_of(text, span),
                message: e.message().to_string(),
            },
            None => ScenarioError::Parse { origin: origin.to_string(), message: e.to_string() },
        })?;
        let invalid = |span: Range<usize>, message: String| ScenarioError::Invalid {
            origin: origin.to_string(),
            line: line_of(text, span),
            message,
        };
        let pcpus = *raw.pcpus.get_ref();
        if pcpus == 0 || pcpus > MAX_SIM_PCPUS {
            return Err(invalid(raw.pcpus.span(), format!("pcpus must be 1..={MAX_SIM_PCPUS}, got {pcpus}")));
        }
        let mut domains = Vec::with_capacity(raw.domain.len());
        let mut names = std::collections::HashSet::new();
        let mut uuids = std::collections::HashSet::new();
        for d in raw.domain {
            let dspan = d.span();
            let d = d.into_inner();
            let name = d.name.get_ref().trim().to_string();
            if name.is_empty() {
                return Err(invalid(d.name.span(), "domain name must not be empty".into()));
            }
            if !names.insert(name.clone()) {
                return Err(invalid(d.name.span(), format!("duplicate domain name {name:?}")));
            }
            let vcpus = match &d.vcpus {
                Some(v) if *v.get_ref() == 0 || *v.get_ref() > MAX_SIM_VCPUS => {
                    return Err(invalid(v.span(), format!("vcpus must be 1..={MAX_SIM_VCPUS}, got {}", v.get_ref())))
                }
                Some(v) => *v.get_ref(),
                None => 1,
            };
            let affinity = match d.affinity {
                None => None,
                Some(a) => {
                    let aspan = a.span();
                    let mut cpus = Vec::new();
                    for c in a.into_inner() {
                        if *c.get_ref() >= pcpus {
                            return Err(invalid(
                                c.span(),
                                format!("affinity of {name:?} names pCPU {} but the host has {pcpus} (0..={})",
                                    c.get_ref(), pcpus - 1),
                            ));
                        }
                        cpus.push(*c.get_ref());
                    }
                    if cpus.is_empty() {
                        return Err(invalid(aspan, format!("affinity of {name:?} is empty")));
                    }
                    cpus.sort_unstable();
                    cpus.dedup();
                    Some(cpus)
                }
            };
            let check_load = |l: &Spanned<f64>| -> Result<f64, ScenarioError> {
                let v = *l.get_ref();
                if !(0.0..=100.0).contains(&v) {
                    return Err(invalid(l.span(), format!("load of {name:?} must be 0..=100 (% of one pCPU), got {v}")));
                }
                Ok(v)
            };
            let load = match (&d.load, d.phases) {
                (Some(_), Some(p)) => {
                    return Err(invalid(p.span(), format!("domain {name:?}: give either load or phases, not both")))
                }
                (None, None) => {
                    return Err(invalid(dspan, format!("domain {name:?}: load or phases is required")))
                }
                (Some(l), None) => LoadProfile::Constant(check_load(l)?),
                (None, Some(p)) => {
                    let pspan = p.span();
                    let mut phases = Vec::new();
                    for ph in p.into_inner() {
                        let ph = ph.into_inner();
                        let secs = *ph.secs.get_ref();
                        if !(MIN_PHASE_SECS..=MAX_PHASE_SECS).contains(&secs) {
                            return Err(invalid(
                                ph.secs.span(),
                                format!("phase secs must be {MIN_PHASE_SECS}..={MAX_PHASE_SECS} (one year), got {secs}"),
                            ));
                        }
                        phases.push((check_load(&ph.load)?, secs));
                    }
                    if phases.is_empty() {
                        return Err(invalid(pspan, format!("domain {name:?}: phases is empty")));
                    }
                    LoadProfile::Phases(phases)
                }
            };
            // As libvirt would: a UUID it can read, printed its way, and one domain per UUID (two sharing one would
            // be one domain to every lookup by UUID).
            let uuid = match d.uuid {
                None => None,
                Some(u) => {
                    let Some(bytes) = crate::hypervisor::parse_uuid(u.get_ref()) else {
                        return Err(invalid(u.span(), format!("uuid of {name:?} is not a UUID: {:?}", u.get_ref())));
                    };
                    if !uuids.insert(bytes) {
                        return Err(invalid(u.span(), format!("uuid of {name:?} is another domain's")));
                    }
                    Some(crate::hypervisor::format_uuid(&bytes))
                }
            };
            domains.push(DomainSpec { name, uuid, vcpus, affinity, load });
        }
        if let Some(r) = raw.random {
            let span = r.span();
            let r = r.into_inner();
            if !(0.0..=100.0).contains(&r.min) || !(r.min..=100.0).contains(&r.max) {
                return Err(invalid(span, format!("random loads need 0 <= min <= max <= 100, got {}..{}", r.min, r.max)));
            }
            if r.vcpus == 0 || r.vcpus > MAX_SIM_VCPUS {
                return Err(invalid(span, format!("random vcpus must be 1..={MAX_SIM_VCPUS}, got {}", r.vcpus)));
            }
            let mut rng = SplitMix64::new(r.seed);
            for i in 0..r.vcpus {
                let name = format!("r{i:03}");
                if !names.insert(name.clone()) {
                    return Err(invalid(span, format!("random domain {name:?} clashes with a [[domain]]")));
                }
                // Round to a tenth of a point so that the generated loads read well in reports.
                let load = (rng.range_f64(r.min, r.max) * 10.0).round() / 10.0;
                let pcpu = rng.below(pcpus);
                domains.push(DomainSpec { name, uuid: None, vcpus: 1, affinity: Some(vec![pcpu]), load: LoadProfile::Constant(load) });
            }
        }
        let noise = match raw.noise {
            None => 0.0,
            Some(n) if (0.0..=MAX_NOISE).contains(n.get_ref()) => *n.get_ref(),
            Some(n) => return Err(invalid(n.span(), format!("noise must be 0..={MAX_NOISE} points, got {}", n.get_ref()))),
        };
        Ok(Scenario { pcpus, hostname: raw.hostname, domains, noise, seed: raw.seed.unwrap_or(0) })
    }
}

/// Scenario files shipped in `scenarios/`, embedded so the demo needs no files on disk.
pub const BUILTIN: &[(&str, &str)] = &[
    ("balanced", include_str!("../../../scenarios/balanced.toml")),
    ("all-on-one", include_str!("../../../scenarios/all-on-one.toml")),
    ("split-first-last", include_str!("../../../scenarios/split-first-last.toml")),
    ("unpinned-identical", include_str!("../../../scenarios/unpinned-identical.toml")),
    ("heavy-light-unpinned", include_str!("../../../scenarios/heavy-light-unpinned.toml")),
    ("changing-load", include_str!("../../../scenarios/changing-load.toml")),
];

/// A built-in scenario by name.
pub fn builtin(name: &str) -> Option<Scenario> {
    BUILTIN
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(n, text)| Scenario::parse(text, n).expect("built-in scenarios are valid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_line(text: &str) -> (usize, String) {
        match Scenario::parse(text, "t.toml") {
            Err(ScenarioError::Invalid { line, message, .. }) => (line, message),
            other => panic!("expected an invalid-scenario error, got {other:?}"),
        }
    }

    #[test]
    fn every_builtin_parses() {
        for (name, text) in BUILTIN {
            let s = Scenario::parse(text, name).unwrap();
            assert!(!s.domains.is_empty(), "{name}");
        }
    }

    /// Every file shipped in scenarios/, built in or not, parses (the evaluation table reads them all).
    #[test]
    fn every_shipped_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let s = Scenario::from_file(&p).unwrap_or_else(|e| panic!("{e}"));
                assert!(!s.domains.is_empty(), "{}", p.display());
                n += 1;
            }
        }
        assert!(n >= BUILTIN.len() + 6, "only {n} scenario files");
    }

    #[test]
    fn random_hosts_are_seeded_and_within_bounds() {
        let text = "pcpus = 8\nrandom = { seed = 5, vcpus = 50, min = 10, max = 20 }\n";
        let a = Scenario::parse(text, "t").unwrap();
        assert_eq!(a, Scenario::parse(text, "t").unwrap());
        assert_eq!(a.domains.len(), 50);
        for d in &a.domains {
            let LoadProfile::Constant(l) = d.load else { panic!("{d:?}") };
            assert!((10.0..=20.0).contains(&l), "{d:?}");
            assert!(d.affinity.as_ref().is_some_and(|a| a.len() == 1 && a[0] < 8), "{d:?}");
        }
        let other = Scenario::parse("pcpus = 8\nrandom = { seed = 6, vcpus = 50, min = 10, max = 20 }\n", "t").unwrap();
        assert_ne!(a.domains, other.domains, "the seed matters");
        assert!(Scenario::parse("pcpus = 8\nrandom = { seed = 5, vcpus = 5, min = 30, max = 20 }\n", "t").is_err());
        assert!(Scenario::parse("pcpus = 8\nnoise = 80\n[[domain]]\nname = \"a\"\nload = 1\n", "t").is_err());
    }

    #[test]
    fn defaults() {
        let s = Scenario::parse("pcpus = 2\n[[domain]]\nname = \"a\"\nload = 30\n", "t").unwrap();
        assert_eq!(s.domains[0].vcpus, 1);
        assert_eq!(s.domains[0].affinity, None);
        assert_eq!(s.domains[0].load, LoadProfile::Constant(30.0));
    }

    #[test]
    fn unknown_key_names_its_line() {
        let (line, msg) = err_line("pcpus = 2\n[[domain]]\nname = \"a\"\nlaod = 30\n");
        assert_eq!(line, 4);
        assert!(msg.contains("laod"), "{msg}");
    }

    #[test]
    fn load_out_of_range_names_its_line() {
        let (line, msg) = err_line("pcpus = 2\n[[domain]]\nname = \"a\"\nload = 130\n");
        assert_eq!(line, 4);
        assert!(msg.contains("0..=100"), "{msg}");
        let (line, _) = err_line("pcpus = 2\n[[domain]]\nname = \"a\"\nphases = [\n { load = 10, secs = 1 },\n { load = -1, secs = 1 }]\n");
        assert_eq!(line, 6);
    }

    #[test]
    fn affinity_to_missing_pcpu_names_its_line() {
        let (line, msg) = err_line("pcpus = 2\n[[domain]]\nname = \"a\"\nload = 1\naffinity = [0, 2]\n");
        assert_eq!(line, 5);
        assert!(msg.contains("pCPU 2"), "{msg}");
    }

    #[test]
    fn other_mistakes_refused() {
        assert!(Scenario::parse("pcpus = 0\n", "t").is_err());
        assert!(Scenario::parse("pcpus = 2\n[[domain]]\nname = \"a\"\n", "t").is_err());
        assert!(Scenario::parse("pcpus = 2\n[[domain]]\nname = \"a\"\nload=1\n[[domain]]\nname = \"a\"\nload=1\n", "t").is_err());
        assert!(Scenario::parse("pcpus = 2\n[[domain]]\nname = \"a\"\nload=1\nphases=[{load=1,secs=1}]\n", "t").is_err());
        assert!(Scenario::parse("pcpus = \"x\"\n", "t").is_err());
    }

    #[test]
    fn phase_lengths_and_uuids_are_checked() {
        let phase = |secs: &str| format!("pcpus = 1\n[[domain]]\nname = \"a\"\nphases = [{{load = 100, secs = {secs}}}]\n");
        // 1e12 s overflowed the model's nanosecond clock and hung the agent; 1e-9 s made one sample take 1e9 steps.
        for secs in ["1e12", "1e-9", "0", "-1", "nan"] {
            let (line, msg) = err_line(&phase(secs));
            assert_eq!(line, 4, "{secs}: {msg}");
            assert!(msg.contains("phase secs must be"), "{secs}: {msg}");
        }
        assert!(Scenario::parse(&phase("0.001"), "t").is_ok() && Scenario::parse(&phase("31536000"), "t").is_ok());

        let dom = |name: &str, uuid: &str| format!("[[domain]]\nname = \"{name}\"\nuuid = \"{uuid}\"\nload = 1\n");
        let u = "6695EB01F6A4830479AA97F2502E193F";
        let ok = Scenario::parse(&format!("pcpus = 1\n{}", dom("a", u)), "t").unwrap();
        assert_eq!(ok.domains[0].uuid.as_deref(), Some("6695eb01-f6a4-8304-79aa-97f2502e193f"), "printed as libvirt does");
        let (line, msg) = err_line(&format!("pcpus = 1\n{}", dom("a", "not-a-uuid")));
        assert!(line == 4 && msg.contains("is not a UUID"), "{line}: {msg}");
        let (line, msg) = err_line(&format!("pcpus = 1\n{}{}", dom("a", u), dom("b", "6695eb01-f6a4-8304-79aa-97f2502e193f")));
        assert!(line == 8 && msg.contains("another domain's"), "{line}: {msg}");
    }

    #[test]
    fn phases_cycle() {
        let p = LoadProfile::Phases(vec![(100.0, 2.0), (10.0, 3.0)]);
        assert_eq!(p.at(0.0), (100.0, Some(2.0)));
        assert_eq!(p.at(2.5).0, 10.0);
        assert_eq!(p.at(5.0).0, 100.0);
        assert_eq!(p.at(7.5).0, 10.0);
    }
}
