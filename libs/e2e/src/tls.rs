//! Certificates a test makes for itself: a CA, server certificates and a client certificate, as
//! PEM files in a directory of their own, for servers and clients that speak TLS.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA of the test's own, with a server certificate for `localhost` and `127.0.0.1` and a client
/// certificate, written under [`TestCertificates::dir`].
pub struct TestCertificates {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCertificates")
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl TestCertificates {
    /// A new CA (`ca.pem`), a server certificate (`server.pem`, `server-key.pem`) for `localhost`
    /// and `127.0.0.1`, and a client certificate (`client.pem`, `client-key.pem`).
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a certificate directory")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "customer-sync test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let certs = TestCertificates { dir, ca };
        std::fs::write(certs.ca_file(), certs.ca.pem()).context("writing ca.pem")?;
        certs.issue("server", &["localhost", "127.0.0.1"], false)?;
        certs.issue("client", &["customer-sync-client"], true)?;
        Ok(certs)
    }

    /// Issues `{name}.pem` and `{name}-key.pem` for `names` (DNS names or IP addresses), for a
    /// server, or for a client when `client`.
    pub fn issue(&self, name: &str, names: &[&str], client: bool) -> anyhow::Result<()> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.ca)?;
        std::fs::write(self.cert(name), cert.pem())
            .with_context(|| format!("writing {name}.pem"))?;
        std::fs::write(self.key(name), key.serialize_pem())
            .with_context(|| format!("writing {name}-key.pem"))?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The certificate `{name}.pem` (`server`, `client`, or one made by [`Self::issue`]).
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}-key.pem"))
    }
}
