//! The controller's memory of its own pins, kept on disk per host (`run --state-dir DIR`).
//!
//! Manual-pin detection compares a vCPU's affinity with the last pin the controller applied to it. That memory lives
//! in the host's task; without a copy on disk, a restarted controller (an upgrade, a reboot of the management node)
//! takes every affinity it finds for its own starting point and may move a vCPU an operator pinned by hand.
//!
//! Each host's pins go to one small JSON file, rewritten (to a temporary file, then renamed) only when they change.
//! With each domain's pins the file keeps the domain's id and CPU time: a domain restarted while the controller was
//! away gets its affinity from its configuration again, which is not an operator's pin, so its saved pins are
//! dropped on load exactly as [`crate::controller::usage`] resets a restarted domain (a new id, or CPU time that
//! went back). The file also keeps the host's boot id (version 2): after a reboot libvirt numbers domains from 1
//! again, so a domain can come back with its old id, and the file's CPU time (written when the pins last changed,
//! perhaps days before) is soon passed; a new boot id drops every saved pin.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::controller::client::address_key;
use crate::controller::policy::VcpuMap;
use crate::model::{HostStats, PcpuId};

/// Format version written in every file; a file of another version (other than 1, read as a file without the boot
/// id) is ignored with a warning.
pub const PINS_FILE_VERSION: u32 = 2;

/// One host's pins as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinsFile {
    pub version: u32,
    /// The host as given to the controller: a file found under another host's name is not used.
    pub host: String,
    /// The host's boot when the file was written (empty: unknown, or a version 1 file).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub boot_id: String,
    pub domains: Vec<DomainPins>,
}

/// One domain's pins, with what tells whether it restarted since.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPins {
    pub uuid: String,
    pub id: u32,
    pub cpu_time_ns: u64,
    /// (vCPU, pCPUs), by vCPU.
    pub vcpus: Vec<(u32, Vec<PcpuId>)>,
}

/// Why a pins file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PinsFileError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{path}: not a pins file: {error}")]
    Parse { path: String, error: serde_json::Error },
    #[error("{path}: version {found}, this controller reads version {PINS_FILE_VERSION}")]
    Version { path: String, found: u32 },
    #[error("{path}: holds the pins of host {found:?}, not of {expected:?}")]
    OtherHost { path: String, found: String, expected: String },
    #[error("{path}: another controller uses this state directory (two would each take the other's pins for an operator's)")]
    Locked { path: String },
}

/// The file of `host` in `dir`, named by the agent's address: `hv1`, `hv1:50151` and `http://hv1/` are one agent
/// and share one file, so a host list that changes how it writes a host keeps its pins. Every byte outside
/// `[A-Za-z0-9.-]` is written as `_xx` (hex), so two hosts never share a file (`hv1:50151` and `hv1_50151` differ)
/// and no host name can reach outside `dir`.
pub fn path_for(dir: &Path, host: &str) -> PathBuf {
    let key = address_key(host);
    file_in(dir, key.split_once("://").map_or(key.as_str(), |(_, rest)| rest))
}

/// Where versions before the address key kept the file of `host`: named by the host as written.
pub fn legacy_path_for(dir: &Path, host: &str) -> PathBuf {
    file_in(dir, host)
}

fn file_in(dir: &Path, host: &str) -> PathBuf {
    let mut name = String::with_capacity(host.len() + 16);
    for b in host.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            name.push(char::from(b));
        } else {
            let _ = write!(name, "_{b:02x}");
        }
    }
    // A leading dot would hide the file and ".." would name the parent: "." never starts a name.
    if name.starts_with('.') {
        name.insert(0, '_');
    }
    name.push_str(".pins.json");
    dir.join(name)
}

/// Reads `path`; `Ok(None)` when there is no such file yet.
pub fn load(path: &Path, host: &str) -> Result<Option<PinsFile>, PinsFileError> {
    let p = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(PinsFileError::Io { path: p, error }),
    };
    // Parsed once as JSON, and the version read first, so that a file of a later format says so instead of failing
    // to parse as this one.
    let parse = |error| PinsFileError::Parse { path: p.clone(), error };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(parse)?;
    let version = value.get("version").and_then(serde_json::Value::as_u64);
    if let Some(found) = version.filter(|&v| v != 1 && v != u64::from(PINS_FILE_VERSION)) {
        return Err(PinsFileError::Version { path: p, found: u32::try_from(found).unwrap_or(u32::MAX) });
    }
    let file: PinsFile = serde_json::from_value(value).map_err(parse)?;
    if address_key(&file.host) != address_key(host) {
        return Err(PinsFileError::OtherHost { path: p, found: file.host, expected: host.to_string() });
    }
    Ok(Some(file))
}

/// Writes `file` to `path` whole: to a temporary file beside it, then renamed over it, so that a crash leaves the old
/// file or the new one, never half of one. Creates the directory if it is missing.
pub fn save(path: &Path, file: &PinsFile) -> Result<(), PinsFileError> {
    let io = |error| PinsFileError::Io { path: path.display().to_string(), error };
    // The directory may have been removed under a running controller (or never made, by a library caller).
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec(file).expect("a pins file always serializes");
    // On disk before the rename, and the rename on disk before returning: after a power loss the file is the old
    // one or the new one, not an empty one.
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    std::io::Write::write_all(&mut f, &text).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(())
}

/// A state directory held by one controller for as long as this lives (an advisory lock on `.lock` in it).
#[derive(Debug)]
pub struct StateDirLock {
    _file: std::fs::File,
}

/// Takes `dir` for this controller, or fails if another one (any process) holds it.
pub fn lock_dir(dir: &Path) -> Result<StateDirLock, PinsFileError> {
    let path = dir.join(".lock");
    let io = |error| PinsFileError::Io { path: path.display().to_string(), error };
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(StateDirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(PinsFileError::Locked { path: dir.display().to_string() }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}

impl PinsFile {
    /// The pins of `host`'s domains that `sample` shows running, with their ids and CPU times from it.
    pub fn from_pins(host: &str, pins: &VcpuMap<Arc<[PcpuId]>>, sample: &HostStats) -> PinsFile {
        let mut by_uuid: BTreeMap<&str, Vec<(u32, Vec<PcpuId>)>> = BTreeMap::new();
        for ((uuid, vcpu), pcpus) in pins {
            by_uuid.entry(&**uuid).or_default().push((*vcpu, pcpus.to_vec()));
        }
        let domains = by_uuid
            .into_iter()
            .filter_map(|(uuid, mut vcpus)| {
                let d = sample.domains.iter().find(|d| d.uuid == uuid)?;
                vcpus.sort_unstable();
                Some(DomainPins { uuid: uuid.to_string(), id: d.id, cpu_time_ns: d.cpu_time_ns, vcpus })
            })
            .collect();
        PinsFile { version: PINS_FILE_VERSION, host: host.to_string(), boot_id: sample.boot_id.clone(), domains }
    }

    /// The saved pins still worth remembering given `sample`: none if the host booted since (both boot ids known and
    /// different), else those of domains that run with the same id and have not gone back in CPU time (so they did
    /// not restart), and that still have that vCPU.
    pub fn restore(&self, sample: &HostStats) -> VcpuMap<Arc<[PcpuId]>> {
        let mut pins = VcpuMap::default();
        if !self.boot_id.is_empty() && !sample.boot_id.is_empty() && self.boot_id != sample.boot_id {
            return pins;
        }
        for saved in &self.domains {
            let Some(d) = sample.domains.iter().find(|d| d.uuid == saved.uuid) else { continue };
            if d.id != saved.id || d.cpu_time_ns < saved.cpu_time_ns {
                continue;
            }
            let uuid: Arc<str> = Arc::from(saved.uuid.as_str());
            for (vcpu, pcpus) in &saved.vcpus {
                if d.vcpus.iter().any(|v| v.index == *vcpu) {
                    pins.insert((Arc::clone(&uuid), *vcpu), Arc::from(pcpus.as_slice()));
                }
            }
        }
        pins
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DomainStats, VcpuStats};

    fn sample(domains: &[(&str, u32, u64, u32)]) -> HostStats {
        HostStats {
            sample_time_ns: 1,
            npcpus: 4,
            online_pcpus: vec![0, 1, 2, 3],
            agent_instance: "a".into(),
            boot_id: String::new(),
            domains: domains
                .iter()
                .map(|&(uuid, id, cpu_time_ns, nvcpus)| DomainStats {
                    uuid: uuid.into(),
                    name: format!("vm-{uuid}"),
                    id,
                    cpu_time_ns,
                    vcpus: (0..nvcpus).map(|i| VcpuStats { index: i, time_ns: 0, pcpu: 0, affinity: vec![0] }).collect(),
                })
                .collect(),
        }
    }

    fn pins(entries: &[(&str, u32, &[PcpuId])]) -> VcpuMap<Arc<[PcpuId]>> {
        entries.iter().map(|&(u, v, p)| ((Arc::from(u), v), Arc::from(p))).collect()
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vcpub-pins-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_state_dir_is_held_by_one_controller_at_a_time() {
        let dir = tmpdir("lock");
        let first = lock_dir(&dir).unwrap();
        let second = lock_dir(&dir).unwrap_err();
        assert!(matches!(second, PinsFileError::Locked { .. }), "{second:?}");
        assert!(second.to_string().contains("another controller"), "{second}");
        drop(first);
        lock_dir(&dir).expect("free again once the first is gone");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn saved_pins_come_back_for_domains_that_did_not_restart() {
        let before = sample(&[("u1", 7, 1_000, 2), ("u2", 8, 5_000, 1), ("u3", 9, 9_000, 1)]);
        let mine = pins(&[("u1", 0, &[1]), ("u1", 1, &[2]), ("u2", 0, &[3]), ("u3", 0, &[0]), ("gone", 0, &[1])]);
        let file = PinsFile::from_pins("hv1:50151", &mine, &before);
        assert_eq!(file.domains.len(), 3, "a domain not in the sample is not saved: {file:?}");

        let dir = tmpdir("roundtrip");
        let path = path_for(&dir, "hv1:50151");
        save(&path, &file).unwrap();
        let back = load(&path, "hv1:50151").unwrap().expect("saved");
        assert_eq!(back, file);

        // u1 ran on; u2 restarted (new id); u3 restarted and got the same id back (its CPU time went back).
        let after = sample(&[("u1", 7, 2_000, 2), ("u2", 12, 6_000, 1), ("u3", 9, 10, 1)]);
        assert_eq!(back.restore(&after), pins(&[("u1", 0, &[1]), ("u1", 1, &[2])]));
        // A vCPU that is gone (unplugged) is not restored.
        let fewer = sample(&[("u1", 7, 2_000, 1)]);
        assert_eq!(back.restore(&fewer), pins(&[("u1", 0, &[1])]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// After a reboot libvirt numbers domains from 1 again: a domain back with its old id, and past the CPU time the
    /// file kept, is still a restarted one. A version 1 file (no boot id) is read with the rule it had.
    #[test]
    fn a_new_boot_drops_every_saved_pin() {
        let mut before = sample(&[("u1", 1, 1_000, 1)]);
        before.boot_id = "boot-a".into();
        let file = PinsFile::from_pins("hv1", &pins(&[("u1", 0, &[2])]), &before);
        assert_eq!(file.boot_id, "boot-a");
        let mut after = sample(&[("u1", 1, 50_000, 1)]);
        after.boot_id = "boot-b".into();
        assert_eq!(file.restore(&after), pins(&[]));
        after.boot_id = "boot-a".into();
        assert_eq!(file.restore(&after), pins(&[("u1", 0, &[2])]));
        after.boot_id.clear();
        assert_eq!(file.restore(&after), pins(&[("u1", 0, &[2])]), "an agent that cannot tell: ids and CPU times");

        let dir = tmpdir("v1");
        let path = path_for(&dir, "hv1");
        let v1 = r#"{"version":1,"host":"hv1","domains":[{"uuid":"u1","id":1,"cpu_time_ns":1000,"vcpus":[[0,[2]]]}]}"#;
        std::fs::write(&path, v1).unwrap();
        let old = load(&path, "hv1").unwrap().expect("a version 1 file is read");
        assert_eq!((old.boot_id.as_str(), old.restore(&after)), ("", pins(&[("u1", 0, &[2])])));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_file_is_no_pins_and_a_bad_one_an_error() {
        let dir = tmpdir("bad");
        let path = path_for(&dir, "hv1");
        assert!(load(&path, "hv1").unwrap().is_none());
        std::fs::write(&path, "{ not json").unwrap();
        assert!(matches!(load(&path, "hv1"), Err(PinsFileError::Parse { .. })));
        std::fs::write(&path, r#"{"version": 3, "host": "hv1", "domains": [], "extra": 1}"#).unwrap();
        let e = load(&path, "hv1").unwrap_err();
        assert!(matches!(e, PinsFileError::Version { found: 3, .. }), "{e}");
        save(&path, &PinsFile { version: PINS_FILE_VERSION, host: "hv2".into(), boot_id: String::new(), domains: vec![] })
            .unwrap();
        let e = load(&path, "hv1").unwrap_err();
        assert!(e.to_string().contains("\"hv2\""), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_names_are_one_per_host_and_stay_in_the_directory() {
        let dir = Path::new("/state");
        assert_eq!(path_for(dir, "hv1.example.org:50151"), Path::new("/state/hv1.example.org_3a50151.pins.json"));
        assert_ne!(path_for(dir, "hv1:50151"), path_for(dir, "hv1_50151"));
        assert_eq!(path_for(dir, "../etc/passwd"), Path::new("/state/_.._2fetc_2fpasswd.pins.json"));
        assert_eq!(path_for(dir, "[::1]:50151").parent(), Some(dir));
        // One agent, one file, however the host is written; the name for an explicit port is the old one.
        for same in ["hv1", " hv1", "http://hv1:50151/", "https://hv1"] {
            assert_eq!(path_for(dir, same), path_for(dir, "hv1:50151"), "{same:?}");
        }
        assert_eq!(path_for(dir, "hv1:50151"), legacy_path_for(dir, "hv1:50151"));
        assert_ne!(path_for(dir, "hv1:50152"), path_for(dir, "hv1:50151"));
    }

    #[test]
    fn a_file_is_read_back_for_the_same_agent_written_another_way() {
        let dir = tmpdir("spelling");
        let path = path_for(&dir, "hv1");
        save(&path, &PinsFile { version: PINS_FILE_VERSION, host: "hv1".into(), boot_id: String::new(), domains: vec![] })
            .unwrap();
        assert!(load(&path_for(&dir, "http://hv1:50151"), "http://hv1:50151").unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
