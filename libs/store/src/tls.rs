//! PostgreSQL over TLS as libpq understands a `DATABASE_URL`: `sslmode` (`disable`, `prefer`,
//! `require`, `verify-ca`, `verify-full`), `sslrootcert` (a PEM file of CAs, or `system` for the
//! machine's store), and `sslcert`/`sslkey` (a client certificate). tokio-postgres knows only the
//! first three modes and none of the files, so these parameters are taken out of the URL or DSN
//! here and turned into a rustls configuration.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode`s this product honours (`allow` is not offered: it prefers clear text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, without checking its certificate (libpq's default).
    Prefer,
    /// TLS always; the certificate is checked against `sslrootcert` when one is given.
    Require,
    /// TLS, and the server's certificate must chain to `sslrootcert` (any host name).
    VerifyCa,
    /// TLS, the certificate must chain to `sslrootcert` and name the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self, String> {
        match value {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
            )),
        }
    }

    fn for_tokio_postgres(self) -> PgSslMode {
        match self {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        }
    }
}

/// The TLS parameters of a `DATABASE_URL`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TlsParams {
    mode: Option<SslMode>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl TlsParams {
    /// Takes `key=value` if it is one of ours; false leaves it to tokio-postgres.
    fn take(&mut self, key: &str, value: String) -> Result<bool, String> {
        match key {
            "sslmode" => self.mode = Some(SslMode::parse(&value)?),
            "sslrootcert" => self.root_cert = Some(value),
            "sslcert" => self.cert = Some(value),
            "sslkey" => self.key = Some(value),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Parses `database_url` (a `postgres://` URL or a `key=value` DSN) into tokio-postgres's config
/// and the TLS connector its `sslmode` asks for. Errors say which setting is wrong and never
/// repeat the URL (it may hold a password).
pub fn database_config(
    database_url: &str,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), String> {
    let (rest, params) = split_tls_params(database_url)?;
    let mut config: tokio_postgres::Config = rest.parse().map_err(|err| format!("{err}"))?;
    let mode = params.mode.unwrap_or(SslMode::Prefer);
    config.ssl_mode(mode.for_tokio_postgres());
    let tls = rustls_config(mode, &params)?;
    Ok((config, MakeRustlsConnect::new(tls)))
}

fn split_tls_params(database_url: &str) -> Result<(String, TlsParams), String> {
    let mut params = TlsParams::default();
    let is_url =
        database_url.starts_with("postgres://") || database_url.starts_with("postgresql://");
    if !is_url {
        let mut kept = Vec::new();
        for (raw, key, value) in dsn_pairs(database_url)? {
            if !params.take(&key, value)? {
                kept.push(raw);
            }
        }
        return Ok((kept.join(" "), params));
    }
    let Some((base, query)) = database_url.split_once('?') else {
        return Ok((database_url.to_owned(), params));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !params.take(&percent_decode(key)?, percent_decode(value)?)? {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, params))
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("a %-escape in the URL's query is not two hex digits")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL's query is not UTF-8 once decoded".to_owned())
}

/// The `key = value` pairs of a libpq DSN, each with its raw text so the others can be passed on
/// untouched. Values may be quoted with `'`, with `\` escaping.
fn dsn_pairs(dsn: &str) -> Result<Vec<(String, String, String)>, String> {
    let chars: Vec<char> = dsn.chars().collect();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_spaces = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_spaces(&mut i);
        if i >= chars.len() {
            return Ok(pairs);
        }
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        skip_spaces(&mut i);
        if chars.get(i) != Some(&'=') {
            return Err(format!("DSN setting {key:?} has no `=`"));
        }
        i += 1;
        skip_spaces(&mut i);
        let mut value = String::new();
        if chars.get(i) == Some(&'\'') {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return Err(format!("the quoted value of {key:?} is not closed")),
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') if i + 1 < chars.len() => {
                        value.push(chars[i + 1]);
                        i += 2;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
        }
        pairs.push((chars[start..i].iter().collect(), key, value));
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(root_cert: Option<&str>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        None | Some("system") => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // A malformed certificate in the system store is not ours to refuse.
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("the system has no CA certificates: give sslrootcert=FILE".to_owned());
            }
        }
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|err| format!("cannot read sslrootcert {path}: {err}"))?;
            for cert in certs {
                let cert = cert.map_err(|err| format!("sslrootcert {path}: {err}"))?;
                roots
                    .add(cert)
                    .map_err(|err| format!("sslrootcert {path}: {err}"))?;
            }
            if roots.is_empty() {
                return Err(format!("sslrootcert {path} holds no PEM certificate"));
            }
        }
    }
    Ok(roots)
}

fn rustls_config(mode: SslMode, params: &TlsParams) -> Result<ClientConfig, String> {
    let provider = provider();
    // libpq: `require` with a root certificate given checks the chain as `verify-ca` does.
    let (check_chain, check_name) = match mode {
        SslMode::VerifyFull => (true, true),
        SslMode::VerifyCa => (true, false),
        SslMode::Require => (params.root_cert.is_some(), false),
        SslMode::Disable | SslMode::Prefer => (false, false),
    };
    let chain = if check_chain {
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots(params.root_cert.as_deref())?),
            provider.clone(),
        )
        .build()
        .map_err(|err| format!("cannot build the certificate verifier: {err}"))?;
        Some(verifier)
    } else {
        None
    };
    let verifier = Arc::new(LibpqVerifier {
        chain,
        check_name,
        algorithms: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("cannot configure TLS: {err}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&params.cert, &params.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|err| format!("cannot read sslcert {cert}: {err}"))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|err| format!("cannot read sslkey {key}: {err}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|err| format!("sslcert/sslkey: {err}"))
        }
        _ => Err("sslcert and sslkey go together".to_owned()),
    }
}

/// What libpq checks of the server's certificate: nothing but the handshake's signatures
/// (`prefer`, `require` without a CA: encrypted against a passive listener, with no proof of who
/// answers), the chain to a trusted root (`verify-ca`), or the chain and the host name
/// (`verify-full`).
#[derive(Debug)]
struct LibpqVerifier {
    chain: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // rustls compares the name only once the chain verified: the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_come_out_of_a_url_and_the_rest_stays() {
        let (rest, params) = split_tls_params(
            "postgres://u:p@h:5/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fca%20dir%2Fca.pem",
        )
        .expect("parses");
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(params.mode, Some(SslMode::VerifyFull));
        assert_eq!(params.root_cert.as_deref(), Some("/ca dir/ca.pem"));
        let (rest, params) = split_tls_params("postgresql://h/db?sslmode=require").expect("parses");
        assert_eq!(
            (rest.as_str(), params.mode),
            ("postgresql://h/db", Some(SslMode::Require))
        );
        let (rest, params) = split_tls_params("postgres://h/db").expect("parses");
        assert_eq!(
            (rest.as_str(), params),
            ("postgres://h/db", TlsParams::default())
        );
    }

    #[test]
    fn tls_parameters_come_out_of_a_dsn_and_the_rest_stays() {
        let (rest, params) = split_tls_params(
            "host=db port = 5 password='a b\\'c' sslmode=verify-ca sslrootcert='/x y/ca.pem' dbname=d",
        )
        .expect("parses");
        assert_eq!(rest, "host=db port = 5 password='a b\\'c' dbname=d");
        assert_eq!(params.mode, Some(SslMode::VerifyCa));
        assert_eq!(params.root_cert.as_deref(), Some("/x y/ca.pem"));
        let config: tokio_postgres::Config = rest.parse().expect("tokio-postgres reads the rest");
        assert_eq!(config.get_password(), Some(&b"a b'c"[..]));
    }

    #[test]
    fn nonsense_is_refused_without_repeating_the_url() {
        let Err(err) = database_config("postgres://u:hunter2@h/db?sslmode=sometimes") else {
            panic!("an unknown mode is refused");
        };
        assert!(err.contains("verify-full"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        let Err(err) =
            database_config("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent.pem")
        else {
            panic!("a missing CA file is refused");
        };
        assert!(err.contains("/nonexistent.pem"), "{err}");
        assert!(split_tls_params("host=h password='open").is_err());
        assert!(database_config("postgres://h/db?sslcert=/c.pem").is_err());
    }

    #[test]
    fn every_mode_builds_a_connector() {
        for mode in ["disable", "prefer", "require"] {
            let (config, _tls) =
                database_config(&format!("postgres://h/db?sslmode={mode}")).expect("builds");
            let expected = match mode {
                "disable" => PgSslMode::Disable,
                "prefer" => PgSslMode::Prefer,
                _ => PgSslMode::Require,
            };
            assert_eq!(config.get_ssl_mode(), expected);
        }
        let (config, _) = database_config("host=h dbname=d").expect("builds");
        assert_eq!(config.get_ssl_mode(), PgSslMode::Prefer);
    }
}
