use std::path::Path;
use std::time::Duration;

/// Oldest nats-server this product supports: 2.11 brought per-message TTLs and consumer pause,
/// and older servers fail async-nats's KV creation.
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 11, 0);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials file {path}: {source}")]
    Credentials {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "cannot connect to NATS at {url}: {source} (is nats-server running? `make infra` starts one)"
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

/// Connects, then refuses servers that are too old or lack JetStream, with a message that says what
/// to do. Reconnects forever once connected: a NATS restart must not kill a long-running service.
pub async fn connect(
    url: &str,
    credentials: Option<&Path>,
    client_name: &str,
) -> Result<async_nats::Client, ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(client_name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None);
    if let Some(path) = credentials {
        options =
            options
                .credentials_file(path)
                .await
                .map_err(|source| ConnectError::Credentials {
                    path: path.display().to_string(),
                    source,
                })?;
    }
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
            url: url.to_owned(),
            source,
        })?;
    let info = client.server_info();
    if parse_version(&info.version) < MIN_SERVER_VERSION {
        return Err(ConnectError::ServerTooOld {
            url: url.to_owned(),
            found: info.version,
        });
    }
    if !info.jetstream {
        return Err(ConnectError::NoJetStream {
            url: url.to_owned(),
        });
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
