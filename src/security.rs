//! Mutual TLS between the controller and its agents, and who may pin.
//!
//! - Both sides load a certificate, its key and the fleet's CA from PEM files ([`TlsFiles`]). The agent requires a
//!   client certificate signed by that CA; the controller checks the agent's certificate against the host name (or
//!   IP address) it dialled. Both checks are rustls's, through tonic.
//! - Roles: any client the CA vouches for may read; only identities on the agent's pin allow-list ([`PinPolicy`])
//!   may call `PinVcpu` and `ApplyPins`. An identity is a certificate's subject common name or one of its DNS
//!   subject alternative names. Without TLS there are no identities, so everyone may pin: that is why the agent
//!   refuses to serve plaintext off loopback unless told `--insecure` ([`check_listen`]).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::error::AgentError;

/// The identity the controller's certificate carries (`vcpu-controller certs` makes it), and the one an agent lets
/// pin when no `--pin-allow` is given.
pub const DEFAULT_PIN_IDENTITY: &str = "vcpu-controller";
/// Longest a TLS handshake may take before the connection is dropped; a client that opens a socket and stalls must
/// not hold a connection slot.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Errors loading TLS material or checking the listen address.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("cannot read {what} {path}: {error}")]
    Read { what: &'static str, path: PathBuf, error: std::io::Error },
    #[error("TLS needs all three of --tls-cert, --tls-key and --tls-ca; missing: {0}")]
    Incomplete(String),
    #[error(
        "refusing to serve plaintext gRPC on {addr}: without TLS anyone who reaches this port can pin every vCPU on \
         this host. Give --tls-cert, --tls-key and --tls-ca (make them with `vcpu-controller certs`), listen on a \
         loopback address, or pass --insecure if a firewall already restricts the port to the controller"
    )]
    PlaintextOffLoopback { addr: SocketAddr },
    #[error("{what} {path}: {reason}")]
    Pem { what: &'static str, path: PathBuf, reason: String },
}

/// The controller's TLS settings for its own transport ([`crate::controller::transport`]): rustls, with this side's
/// certificate and the CA that must have signed every agent's. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    config: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
}

impl ClientTls {
    pub fn config(&self) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
        self.config.clone()
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls { .. }")
    }
}

/// The three PEM files of one side of a mutual TLS connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This side's certificate (chain), PEM.
    pub cert: PathBuf,
    /// This side's private key, PEM.
    pub key: PathBuf,
    /// The CA that signed the other side's certificate, PEM.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// `None` when no TLS flag is given, the files when all three are, and an error naming the missing ones when
    /// only some are (a half-configured TLS must not silently fall back to plaintext).
    pub fn from_flags(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, SecurityError> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles { cert, key, ca })),
            (c, k, a) => {
                let missing: Vec<&str> = [("--tls-cert", c.is_none()), ("--tls-key", k.is_none()), ("--tls-ca", a.is_none())]
                    .into_iter()
                    .filter_map(|(n, m)| m.then_some(n))
                    .collect();
                Err(SecurityError::Incomplete(missing.join(", ")))
            }
        }
    }

    fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
        std::fs::read(path).map_err(|error| SecurityError::Read { what, path: path.to_path_buf(), error })
    }

    fn identity(&self) -> Result<Identity, SecurityError> {
        Ok(Identity::from_pem(Self::read("certificate", &self.cert)?, Self::read("key", &self.key)?))
    }

    fn ca_cert(&self) -> Result<Certificate, SecurityError> {
        Ok(Certificate::from_pem(Self::read("CA certificate", &self.ca)?))
    }

    /// The agent's side: its identity, and a client certificate signed by the CA required on every connection.
    /// The files are checked first ([`Self::check_server_files`]).
    pub fn server_config(&self) -> Result<ServerTlsConfig, SecurityError> {
        self.check_server_files()?;
        Ok(ServerTlsConfig::new()
            .identity(self.identity()?)
            .client_ca_root(self.ca_cert()?)
            .client_auth_optional(false)
            .timeout(TLS_HANDSHAKE_TIMEOUT))
    }

    /// The same client settings for a plain tonic `Channel` (tools and tests that talk to an agent without the
    /// controller's transport). The agent's name is checked against the host in the dialled URI.
    pub fn client_config(&self) -> Result<ClientTlsConfig, SecurityError> {
        Ok(ClientTlsConfig::new().identity(self.identity()?).ca_certificate(self.ca_cert()?).timeout(TLS_HANDSHAKE_TIMEOUT))
    }

    /// The controller's side: its identity, and the CA that must have signed the agent's certificate. The agent's
    /// name is checked against the host part of the address the controller dials. ALPN offers only `h2`, as
    /// tonic's own client does.
    pub fn client_tls(&self) -> Result<ClientTls, SecurityError> {
        use tokio_rustls::rustls;
        let (roots, chain, key, provider) = self.parse()?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| pem("certificate", &self.cert, &e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| pem("key", &self.key, &e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ClientTls { config: std::sync::Arc::new(config) })
    }

    /// Checks the agent's files the way its TLS server will use them, so that a bad file refuses the start with
    /// the file named, before anything listens (tonic reads them only when it starts serving, and says neither
    /// which file nor that it had already logged "listening").
    pub fn check_server_files(&self) -> Result<(), SecurityError> {
        use tokio_rustls::rustls;
        let (roots, chain, key, provider) = self.parse()?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(std::sync::Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| pem("CA certificate", &self.ca, &e))?;
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| pem("certificate", &self.cert, &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| pem("key", &self.key, &e))?;
        Ok(())
    }

    /// The CA roots, this side's chain and key, and the crypto provider, each file's error naming it.
    #[allow(clippy::type_complexity)]
    fn parse(
        &self,
    ) -> Result<
        (
            tokio_rustls::rustls::RootCertStore,
            Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>,
            tokio_rustls::rustls::pki_types::PrivateKeyDer<'static>,
            std::sync::Arc<tokio_rustls::rustls::crypto::CryptoProvider>,
        ),
        SecurityError,
    > {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |what: &'static str, path: &Path| -> Result<Vec<CertificateDer<'static>>, SecurityError> {
            let bytes = Self::read(what, path)?;
            let v = CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>().map_err(|e| pem(what, path, &e))?;
            if v.is_empty() {
                return Err(pem(what, path, &"no PEM certificate in the file"));
            }
            Ok(v)
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in certs("CA certificate", &self.ca)? {
            roots.add(c).map_err(|e| pem("CA certificate", &self.ca, &e))?;
        }
        let chain = certs("certificate", &self.cert)?;
        let key = PrivateKeyDer::from_pem_slice(&Self::read("key", &self.key)?).map_err(|e| pem("key", &self.key, &e))?;
        Ok((roots, chain, key, std::sync::Arc::new(rustls::crypto::ring::default_provider())))
    }
}

/// A PEM file that does not hold what it should.
fn pem(what: &'static str, path: &Path, e: &dyn std::fmt::Display) -> SecurityError {
    SecurityError::Pem { what, path: path.to_path_buf(), reason: e.to_string() }
}

/// Refuses plaintext on any address but loopback unless `insecure` is set.
pub fn check_listen(addr: SocketAddr, tls: bool, insecure: bool) -> Result<(), SecurityError> {
    if tls || insecure || addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(SecurityError::PlaintextOffLoopback { addr })
    }
}

/// Who may call the pin RPCs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinPolicy {
    /// Plaintext: nobody has an identity, so nobody can be told apart; every caller may pin.
    Anyone,
    /// TLS: only clients whose certificate names one of these identities.
    Allow(BTreeSet<String>),
}

impl PinPolicy {
    /// The policy for an agent: `Anyone` without TLS; with TLS, the given names, or [`DEFAULT_PIN_IDENTITY`] when
    /// none is given.
    pub fn for_agent(tls: bool, allow: &[String]) -> PinPolicy {
        if !tls {
            return PinPolicy::Anyone;
        }
        let names: BTreeSet<String> = allow.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if names.is_empty() {
            PinPolicy::Allow(BTreeSet::from([DEFAULT_PIN_IDENTITY.to_string()]))
        } else {
            PinPolicy::Allow(names)
        }
    }

    /// Decides whether the peer presenting `certs` (leaf first, as rustls hands them over) may pin.
    pub fn check(&self, certs: Option<&[tonic::transport::CertificateDer<'static>]>) -> Result<(), AgentError> {
        let allowed = match self {
            PinPolicy::Anyone => return Ok(()),
            PinPolicy::Allow(a) => a,
        };
        let Some(leaf) = certs.and_then(|c| c.first()) else {
            return Err(AgentError::PermissionDenied("pinning needs a client certificate".into()));
        };
        let names = identities(leaf.as_ref());
        if names.iter().any(|n| allowed.contains(n)) {
            Ok(())
        } else {
            Err(AgentError::PermissionDenied(format!(
                "client {} may read but not pin (allowed to pin: {})",
                if names.is_empty() { "without a name".to_string() } else { names.join("/") },
                allowed.iter().cloned().collect::<Vec<_>>().join(", ")
            )))
        }
    }
}

/// The identities a certificate carries: its subject common names, then its DNS subject alternative names. A
/// certificate that does not parse has none (rustls already verified it, so this does not happen in practice).
pub fn identities(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> =
        cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_string).collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for g in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = g {
                names.push((*d).to_string());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_tls_flags_are_refused() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(TlsFiles::from_flags(None, None, None).unwrap(), None);
        assert!(TlsFiles::from_flags(p("c"), p("k"), p("a")).unwrap().is_some());
        let e = TlsFiles::from_flags(p("c"), None, None).unwrap_err().to_string();
        assert!(e.contains("--tls-key, --tls-ca"), "{e}");
    }

    #[test]
    fn plaintext_only_on_loopback_unless_insecure() {
        let lo: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let lo6: SocketAddr = "[::1]:1".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:1".parse().unwrap();
        assert!(check_listen(lo, false, false).is_ok());
        assert!(check_listen(lo6, false, false).is_ok());
        assert!(check_listen(any, false, false).unwrap_err().to_string().contains("--insecure"));
        assert!(check_listen(any, true, false).is_ok());
        assert!(check_listen(any, false, true).is_ok());
    }

    #[test]
    fn default_allow_list_is_the_controller() {
        assert_eq!(PinPolicy::for_agent(false, &["x".into()]), PinPolicy::Anyone);
        assert_eq!(
            PinPolicy::for_agent(true, &[]),
            PinPolicy::Allow(BTreeSet::from([DEFAULT_PIN_IDENTITY.to_string()]))
        );
        assert_eq!(PinPolicy::for_agent(true, &["a".into(), " ".into()]), PinPolicy::Allow(BTreeSet::from(["a".into()])));
        let e = PinPolicy::for_agent(true, &[]).check(None).unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::PermissionDenied);
    }
}
