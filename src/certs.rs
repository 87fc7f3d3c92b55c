//! `vcpu-controller certs`: a private CA and the certificates of a small fleet, so mutual TLS takes minutes.
//!
//! The CA signs one server certificate per agent host (its name or IP address as subject alternative name, so the
//! controller can check it against the address it dials), one client certificate for the controller (identity
//! [`DEFAULT_PIN_IDENTITY`], which agents let pin by default), and optional read-only client certificates (for
//! monitoring: any identity the agent's pin allow-list does not name may only read).
//!
//! Keys are written mode 0600 and no existing file is overwritten, so re-running the command cannot replace a CA
//! a fleet already trusts.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::security::DEFAULT_PIN_IDENTITY;

/// How long the generated certificates are valid. Long enough that a small fleet does not have to rotate often,
/// short enough that a leaked key does not stay good forever.
pub const CERT_VALIDITY_DAYS: i64 = 825;
/// File name of the CA certificate (give it to every agent and the controller as `--tls-ca`).
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA key (keep it offline; only needed to make more certificates).
pub const CA_KEY_FILE: &str = "ca.key";

/// Errors making certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no --host given: name every agent host (as the controller dials it)")]
    NoHosts,
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: String },
    #[error("{path} already exists; refusing to overwrite (use an empty --out directory)")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {error}")]
    Write { path: PathBuf, error: std::io::Error },
    #[error("cannot make certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// What to make.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    /// Agent hosts, as the controller dials them (DNS name or IP address, without port).
    pub hosts: Vec<String>,
    /// The controller's identity (common name and DNS SAN).
    pub controller: String,
    /// Extra read-only client identities.
    pub readers: Vec<String>,
}

impl FleetSpec {
    /// Agents for `hosts` and a controller with the default pin identity.
    pub fn new(hosts: Vec<String>) -> FleetSpec {
        FleetSpec { hosts, controller: DEFAULT_PIN_IDENTITY.to_string(), readers: Vec::new() }
    }
}

/// One file written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub path: PathBuf,
    pub what: String,
}

// A name becomes a file name and a certificate name: keep it to what both accept.
fn check_name(name: &str) -> Result<(), CertError> {
    let bad = |reason: &str| CertError::BadName { name: name.to_string(), reason: reason.to_string() };
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1 to 253 characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')) {
        return Err(bad("use letters, digits, '.', '-', '_' (or an IP address)"));
    }
    // A ':' belongs only in an IPv6 address; "hv1:50151" is a host with a port, which no certificate can name.
    if name.contains(':') && name.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(bad("give the host without a port (the certificate names the host, not the port)"));
    }
    Ok(())
}

fn leaf_params(name: &str, eku: ExtendedKeyUsagePurpose) -> Result<CertificateParams, CertError> {
    check_name(name)?;
    // rcgen makes an IP address SAN for an IP and a DNS SAN otherwise, which is what rustls checks against.
    let mut p = CertificateParams::new(vec![name.to_string()])?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    validity(&mut p);
    Ok(p)
}

fn validity(p: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack before now so a host whose clock lags a few minutes still accepts a fresh certificate.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(CERT_VALIDITY_DAYS);
}

fn write_new(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true).mode(if private { 0o600 } else { 0o644 });
    let mut f = opts.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists { path: path.to_path_buf() }
        } else {
            CertError::Write { path: path.to_path_buf(), error: source }
        }
    })?;
    f.write_all(contents.as_bytes()).map_err(|error| CertError::Write { path: path.to_path_buf(), error })
}

/// Makes the CA and every certificate of `spec` in `out` (created if missing). Returns the files written.
pub fn generate_fleet(out: &Path, spec: &FleetSpec) -> Result<Vec<Written>, CertError> {
    if spec.hosts.is_empty() {
        return Err(CertError::NoHosts);
    }
    // Check every name before writing anything, so a typo leaves no half-made fleet behind.
    for n in spec.hosts.iter().chain(&spec.readers).chain(std::iter::once(&spec.controller)) {
        check_name(n)?;
    }
    std::fs::create_dir_all(out).map_err(|error| CertError::Write { path: out.to_path_buf(), error })?;
    for f in [CA_CERT_FILE, CA_KEY_FILE] {
        if out.join(f).exists() {
            return Err(CertError::Exists { path: out.join(f) });
        }
    }

    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "vcpu-balancer fleet CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut ca);
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = CertifiedIssuer::self_signed(ca, ca_key)?;

    let mut written = Vec::new();
    let mut put = |name: &str, contents: &str, private: bool, what: String| -> Result<(), CertError> {
        let path = out.join(name);
        write_new(&path, contents, private)?;
        written.push(Written { path, what });
        Ok(())
    };
    put(CA_CERT_FILE, &issuer.pem(), false, "CA certificate: --tls-ca on every agent and the controller".into())?;
    put(CA_KEY_FILE, &ca_key_pem, true, "CA key: keep it offline, only needed to make more certificates".into())?;

    let mut leaf = |file: String, name: &str, eku: ExtendedKeyUsagePurpose, what: String| -> Result<(), CertError> {
        let key = KeyPair::generate()?;
        let cert = leaf_params(name, eku)?.signed_by(&key, &issuer)?;
        put(&format!("{file}.crt"), &cert.pem(), false, format!("{what} certificate"))?;
        put(&format!("{file}.key"), &key.serialize_pem(), true, format!("{what} key"))
    };
    for h in &spec.hosts {
        leaf(format!("agent-{h}"), h, ExtendedKeyUsagePurpose::ServerAuth, format!("agent {h}:"))?;
    }
    leaf(
        "controller".into(),
        &spec.controller,
        ExtendedKeyUsagePurpose::ClientAuth,
        format!("controller (identity {:?}, may pin):", spec.controller),
    )?;
    for r in &spec.readers {
        leaf(format!("reader-{r}"), r, ExtendedKeyUsagePurpose::ClientAuth, format!("read-only client {r:?}:"))?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vcpu-certs-{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn makes_a_fleet_with_the_right_identities_and_private_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tmp("fleet");
        let spec = FleetSpec { readers: vec!["monitor".into()], ..FleetSpec::new(vec!["hv1".into(), "10.0.0.7".into()]) };
        let w = generate_fleet(&dir, &spec).unwrap();
        assert_eq!(w.len(), 2 + 2 * 4);
        let pem = std::fs::read(dir.join("controller.crt")).unwrap();
        let der = rustls_pemfile_der(&pem);
        assert_eq!(crate::security::identities(&der), vec![DEFAULT_PIN_IDENTITY.to_string(), DEFAULT_PIN_IDENTITY.into()]);
        let der = rustls_pemfile_der(&std::fs::read(dir.join("reader-monitor.crt")).unwrap());
        assert!(crate::security::identities(&der).contains(&"monitor".to_string()));
        for k in ["ca.key", "agent-hv1.key", "controller.key"] {
            let mode = std::fs::metadata(dir.join(k)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{k}");
        }
        // A second run must not replace the CA the fleet trusts.
        assert!(matches!(generate_fleet(&dir, &spec), Err(CertError::Exists { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_names_write_nothing() {
        let dir = tmp("bad");
        let spec = FleetSpec::new(vec!["ok".into(), "../etc/x".into()]);
        assert!(matches!(generate_fleet(&dir, &spec), Err(CertError::BadName { .. })));
        assert!(!dir.exists());
        assert!(matches!(generate_fleet(&dir, &FleetSpec::new(vec![])), Err(CertError::NoHosts)));
        let with_port = FleetSpec::new(vec!["hv1:50151".into()]);
        assert!(matches!(generate_fleet(&dir, &with_port), Err(CertError::BadName { .. })));
        assert!(!dir.exists());
    }

    fn rustls_pemfile_der(pem: &[u8]) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem).expect("PEM").1.contents
    }
}
