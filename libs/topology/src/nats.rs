use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};

use crate::redact;

/// Oldest nats-server this product supports: 2.11 brought per-message TTLs and consumer pause,
/// and older servers fail async-nats's KV creation.
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 11, 0);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials or TLS file {path}: {source}")]
    Credentials {
        path: String,
        source: std::io::Error,
    },
    #[error("NATS settings conflict: {0}")]
    Settings(String),
    #[error(
        "cannot connect to NATS at {url}: {source} (is nats-server running? `make infra` starts one; \
         a refused authorization means the user, password, nkey or creds file is wrong; a TLS error \
         names the CA or certificate to check)"
    )]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error(
        "NATS at {url} is version {found}, older than the {}.{}.{} this product needs: \
         run a current nats-server (`make infra` installs one under .run/)",
        MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1, MIN_SERVER_VERSION.2
    )]
    ServerTooOld { url: String, found: String },
    #[error("NATS at {url} does not have JetStream enabled: start nats-server with -js")]
    NoJetStream { url: String },
}

impl ConnectError {
    /// Worth trying again: the server may not be up yet (refused, timed out, name not resolvable
    /// yet). A refused login, a TLS mismatch, a bad setting or an old server stay as they are
    /// however long one waits, so they fail at once.
    pub fn is_transient(&self) -> bool {
        use async_nats::ConnectErrorKind as Kind;
        match self {
            ConnectError::Connect { source, .. } => matches!(
                source.kind(),
                Kind::Io | Kind::TimedOut | Kind::Dns | Kind::MaxReconnects
            ),
            _ => false,
        }
    }
}

/// Who this client is to NATS and how its connection is protected; everything optional (an open
/// development server needs none of it). At most one of a creds file, an nkey seed file and a
/// user with password; TLS with a CA file and an optional client certificate. Its Debug shows
/// which files are used, never the password (a `SecretString`).
#[derive(Debug, Clone, Default)]
pub struct NatsSecurity {
    /// A `.creds` file (JWT and nkey seed), for servers in operator mode.
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU…`), for servers that list users by public nkey.
    pub nkey_file: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<SecretString>,
    /// PEM file of the CA(s) the server's certificate must chain to. Setting it requires TLS.
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate and key this client presents, for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl NatsSecurity {
    /// Only a creds file: what the services took before users, nkeys and TLS.
    pub fn creds(path: Option<&Path>) -> Self {
        NatsSecurity {
            creds_file: path.map(Path::to_path_buf),
            ..NatsSecurity::default()
        }
    }

    /// Loads the credentials and TLS material into `options`. Every file is read or checked
    /// here, so a wrong path fails before any connection attempt, naming the file.
    async fn apply(
        &self,
        mut options: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, ConnectError> {
        let chosen = [
            self.creds_file.is_some(),
            self.nkey_file.is_some(),
            self.user.is_some() || self.password.is_some(),
        ];
        if chosen.iter().filter(|c| **c).count() > 1 {
            return Err(ConnectError::Settings(
                "give one of --nats-creds, --nats-nkey and --nats-user/--nats-password".to_owned(),
            ));
        }
        let unreadable = |path: &Path| {
            let path = path.display().to_string();
            move |source| ConnectError::Credentials { path, source }
        };
        if let Some(path) = &self.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(unreadable(path))?;
        }
        if let Some(path) = &self.nkey_file {
            let seed = tokio::fs::read_to_string(path)
                .await
                .map_err(unreadable(path))?;
            options = options.nkey(seed.trim().to_owned());
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => {
                options =
                    options.user_and_password(user.clone(), password.expose_secret().to_owned());
            }
            (None, None) => {}
            _ => {
                return Err(ConnectError::Settings(
                    "--nats-user and --nats-password (NATS_USER, NATS_PASSWORD) go together"
                        .to_owned(),
                ));
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConnectError::Settings(
                "--nats-tls-cert and --nats-tls-key go together".to_owned(),
            ));
        }
        for path in [&self.tls_ca, &self.tls_cert, &self.tls_key]
            .into_iter()
            .flatten()
        {
            // async-nats reads them only when it connects; a typo should say which file.
            tokio::fs::metadata(path).await.map_err(unreadable(path))?;
        }
        if let Some(ca) = &self.tls_ca {
            // A CA means the operator expects TLS: never fall back to plain text.
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        Ok(options)
    }
}

/// The subject prefix of the replies a client named `client_name` receives. Each service has its
/// own, so a NATS user can be allowed to read its own replies and nobody else's.
pub fn inbox_prefix(client_name: &str) -> String {
    format!("_INBOX.{client_name}")
}

/// [`connect_with`] with at most a creds file.
pub async fn connect(
    url: &str,
    credentials: Option<&Path>,
    client_name: &str,
) -> Result<async_nats::Client, ConnectError> {
    connect_with(url, &NatsSecurity::creds(credentials), client_name).await
}

/// Connects with `security`, then refuses servers that are too old or lack JetStream, with a
/// message that says what to do. Reconnects forever once connected: a NATS restart must not kill a
/// long-running service. Every message names the server with its credentials redacted.
pub async fn connect_with(
    url: &str,
    security: &NatsSecurity,
    client_name: &str,
) -> Result<async_nats::Client, ConnectError> {
    let options = async_nats::ConnectOptions::new()
        .name(client_name)
        .custom_inbox_prefix(inbox_prefix(client_name))
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None);
    let options = security.apply(options).await?;
    // NATS_URL may list several servers of a cluster, comma-separated.
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let client = options
        .connect(servers.as_slice())
        .await
        .map_err(|source| ConnectError::Connect {
            url: redact(url),
            source,
        })?;
    let info = client.server_info();
    if parse_version(&info.version) < MIN_SERVER_VERSION {
        return Err(ConnectError::ServerTooOld {
            url: redact(url),
            found: info.version,
        });
    }
    if !info.jetstream {
        return Err(ConnectError::NoJetStream { url: redact(url) });
    }
    Ok(client)
}

fn parse_version(version: &str) -> (u64, u64, u64) {
    let core = version.split(['-', '+']).next().unwrap_or_default();
    let mut parts = core.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert!(parse_version("2.9.10") < MIN_SERVER_VERSION);
        assert!(parse_version("2.15.1") >= MIN_SERVER_VERSION);
        assert!(parse_version("2.11.0-RC.1") >= MIN_SERVER_VERSION);
        assert!(parse_version("garbage") < MIN_SERVER_VERSION);
    }
}
