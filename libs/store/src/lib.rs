//! PostgreSQL: the connection pool, the embedded versioned schema migrations, and the queries the
//! persister and `syncctl` share over the `customers`, `rejected_rows` and `dead_letters` tables
//! (the batch writes of outcomes, and [`dead_letters`] for reading what the CRM refused), and
//! connections over TLS as the URL's `sslmode` asks.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

pub mod dead_letters;
mod outcomes;
mod tls;

pub use tls::SslMode;

pub use outcomes::{
    BatchReport, Outcome, PoisonMessage, WriteStrategy, poison_message_count, write_batch,
    write_batch_with,
};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Default `DATABASE_URL` of every binary: a local PostgreSQL with the stock superuser.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Newest schema version this build knows.
pub const SCHEMA_VERSION: i32 = 4;

/// Arbitrary, fixed: serialises migrations when several processes start at once.
const MIGRATION_LOCK_ID: i64 = 0x5359_4e43_4d49_4752;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "invalid DATABASE_URL {url:?}: {message} (a postgres:// URL or a key-value DSN; TLS with \
         sslmode=disable|prefer|require|verify-ca|verify-full and sslrootcert=FILE|system)"
    )]
    InvalidUrl { url: String, message: String },
    #[error("cannot build the PostgreSQL pool for {url}: {message}")]
    Pool { url: String, message: String },
    #[error(
        "cannot connect to PostgreSQL at {url}: {message} (is it running? `make infra` starts one)"
    )]
    Connect { url: String, message: String },
    /// The server answered, with an error (wrong password, no such database, TLS refused): waiting
    /// does not help, unlike [`StoreError::Connect`].
    #[error("PostgreSQL at {url} refused the connection: {message}")]
    Refused { url: String, message: String },
    #[error("migrating the schema failed: {0}")]
    Migration(String),
    #[error("{action} failed: {}", describe(source))]
    Query {
        action: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("cannot store {what}")]
    InvalidData { what: String },
    #[error("{what} is not valid JSON: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
}

impl StoreError {
    pub fn query(action: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
        move |source| StoreError::Query { action, source }
    }

    /// True when the rows written are at fault (PostgreSQL refused a value or a constraint), so the
    /// same write will fail again however often it is retried; false for connection and server
    /// trouble, which a retry after a pause can cure.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::InvalidData { .. } => true,
            StoreError::Query { source, .. } => source.code().is_some_and(|code| {
                // 22: data exception (bad encoding, NUL byte, out of range); 23: integrity
                // constraint; 54: program limit (a value too large for an index).
                matches!(&code.code()[..2], "22" | "23" | "54")
            }),
            _ => false,
        }
    }
}

/// tokio-postgres displays a server error as just "db error"; the server's message, code and
/// detail are what an operator needs.
fn describe(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            text
        }
        None => match std::error::Error::source(err) {
            Some(cause) => format!("{err}: {cause}"),
            None => err.to_string(),
        },
    }
}

/// tokio-postgres's config for `database_url` with this product's defaults (a 5-s connect timeout,
/// an application name), and the TLS connector its `sslmode` asks for.
fn database_config(
    database_url: &str,
) -> Result<
    (
        tokio_postgres::Config,
        tokio_postgres_rustls::MakeRustlsConnect,
    ),
    StoreError,
> {
    let (mut pg_config, tls) =
        tls::database_config(database_url).map_err(|message| StoreError::InvalidUrl {
            url: redact(database_url),
            message,
        })?;
    if pg_config.get_connect_timeout().is_none() {
        pg_config.connect_timeout(Duration::from_secs(5));
    }
    if pg_config.get_application_name().is_none() {
        pg_config.application_name("customer-sync");
    }
    Ok((pg_config, tls))
}

/// A failed connection attempt: refused when the server answered with an error, unreachable
/// otherwise.
pub fn connect_failed(database_url: &str, err: &tokio_postgres::Error) -> StoreError {
    let (url, message) = (redact(database_url), redact(&describe(err)));
    if err.as_db_error().is_some() {
        StoreError::Refused { url, message }
    } else {
        StoreError::Connect { url, message }
    }
}

/// One connection, its I/O driven by a background task: for CLIs and tests, which never need a
/// pool. TLS as the URL's `sslmode` asks.
pub async fn connect_one(database_url: &str) -> Result<tokio_postgres::Client, StoreError> {
    let (pg_config, tls) = database_config(database_url)?;
    let (client, connection) = pg_config
        .connect(tls)
        .await
        .map_err(|err| connect_failed(database_url, &err))?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(err = %redact(&describe(&err)), "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// A pool of `max_size` connections. Connecting is lazy: an unreachable database shows on first use.
pub fn connect_pool(database_url: &str, max_size: usize) -> Result<Pool, StoreError> {
    let (pg_config, tls) = database_config(database_url)?;
    let manager = Manager::from_config(
        pg_config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|err| StoreError::Pool {
            url: redact(database_url),
            message: err.to_string(),
        })
}

/// Takes a connection, turning pool errors into a message that names the database.
pub async fn connection(
    pool: &Pool,
    database_url: &str,
) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(|err| match err {
        deadpool_postgres::PoolError::Backend(e) => connect_failed(database_url, &e),
        other => StoreError::Connect {
            url: redact(database_url),
            message: redact(&other.to_string()),
        },
    })
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<String>,
    pub version: i32,
}

/// Applies every embedded migration the database lacks, up to `target` (None: all). Safe to call
/// from several processes at once: they queue on an advisory lock.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    target: Option<i32>,
) -> Result<MigrationReport, StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_ID])
        .await
        .map_err(StoreError::query("taking the migration lock"))?;
    let runner = embedded::migrations::runner().set_target(match target {
        Some(version) => refinery::Target::Version(version),
        None => refinery::Target::Latest,
    });
    let outcome = runner.run_async(client).await;
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_ID])
        .await;
    let report = outcome.map_err(|err| StoreError::Migration(err.to_string()))?;
    unlock.map_err(StoreError::query("releasing the migration lock"))?;
    let applied = report
        .applied_migrations()
        .iter()
        .map(|m| format!("V{}__{}", m.version(), m.name()))
        .collect();
    let version = schema_version(client).await?;
    Ok(MigrationReport { applied, version })
}

/// The newest applied migration, 0 on an empty database.
pub async fn schema_version(client: &tokio_postgres::Client) -> Result<i32, StoreError> {
    let exists = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL",
            &[],
        )
        .await
        .map_err(StoreError::query("checking for the migration history"))?;
    if !exists.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM refinery_schema_history",
            &[],
        )
        .await
        .map_err(StoreError::query("reading the schema version"))?;
    Ok(row.get(0))
}

/// Row counts of the three tables, for status and reconciliation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableCounts {
    pub customers: i64,
    pub rejected_rows: i64,
    pub dead_letters: i64,
}

pub async fn table_counts(client: &tokio_postgres::Client) -> Result<TableCounts, StoreError> {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM rejected_rows), \
             (SELECT count(*) FROM dead_letters)",
            &[],
        )
        .await
        .map_err(StoreError::query("counting rows"))?;
    Ok(TableCounts {
        customers: row.get(0),
        rejected_rows: row.get(1),
        dead_letters: row.get(2),
    })
}

/// The URL or DSN without its password, for messages and logs.
pub use sync_topology::redact;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("host=/tmp"), "host=/tmp");
    }
}
