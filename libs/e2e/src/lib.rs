//! Test harness shared by every crate's integration tests and the end-to-end suite: the real NATS
//! and PostgreSQL the tests talk to (the shared dev instances, or private ones a test may stop and
//! restart), unique namespaces and databases so tests never see each other's data, the workspace's
//! binaries as child processes, and waiting on conditions with deadlines.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

pub mod cluster;
pub mod expect;
pub mod pipeline;
pub mod tls;

/// Reads `NATS_URL` / `DATABASE_URL` etc. from the environment, falling back to the `.run/env`
/// that `make infra` writes, so `cargo test` works on its own after `make infra`.
pub fn env_var(name: &str) -> anyhow::Result<String> {
    if let Ok(value) = std::env::var(name) {
        return Ok(value);
    }
    let env_file = workspace_root().join(".run/env");
    if let Ok(text) = std::fs::read_to_string(&env_file) {
        for line in text.lines() {
            let line = line.trim_start_matches("export ");
            if let Some((key, value)) = line.split_once('=')
                && key == name
            {
                return Ok(value.trim().to_owned());
            }
        }
    }
    bail!(
        "{name} is not set and not in {}: run `make infra` first",
        env_file.display()
    )
}

pub fn workspace_root() -> PathBuf {
    // libs/e2e → workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The shared development NATS server's URL.
pub fn nats_url() -> anyhow::Result<String> {
    env_var("NATS_URL")
}

/// A namespace no other test uses: `t_` and 12 random hex digits.
pub fn unique_namespace() -> String {
    format!("t_{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// A port nothing listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until `condition` returns `Some`, polling every 50 ms, or fails after `timeout` with
/// `what` in the message.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut condition: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A database of its own for one test, created on the shared server and dropped with the value.
#[derive(Debug)]
pub struct TestDatabase {
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    pub async fn create() -> anyhow::Result<Self> {
        Self::create_on(&env_var("DATABASE_URL")?).await
    }

    pub async fn create_on(admin_url: &str) -> anyhow::Result<Self> {
        let name = format!("t_{:016x}", rand::random::<u64>());
        let client = sync_store::connect_one(admin_url).await?;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let url = replace_database(admin_url, &name);
        Ok(TestDatabase {
            url,
            name,
            admin_url: admin_url.to_owned(),
        })
    }

    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        Ok(sync_store::connect_one(&self.url).await?)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Best effort, off the async runtime: a failed test leaves its database for inspection.
        if std::thread::panicking() {
            return;
        }
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(client) = sync_store::connect_one(&admin).await {
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// `postgres://u@h:p/old?x` → `postgres://u@h:p/new?x`.
pub fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..].find('/').map(|i| i + scheme_end);
    let host_part = match path_start {
        Some(i) => &base[..i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{database}?{q}"),
        None => format!("{host_part}/{database}"),
    }
}

/// A nats-server of the test's own, on a free port with its own store directory, that the test may
/// stop and restart (the store survives restarts). [`PrivateNats::start_with`] adds configuration
/// (accounts and users, TLS) and connects as `admin` to see it ready.
#[derive(Debug)]
pub struct PrivateNats {
    pub port: u16,
    pub store: tempfile::TempDir,
    child: Option<Child>,
    config: Option<PathBuf>,
    admin: sync_topology::NatsSecurity,
}

impl PrivateNats {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with("", sync_topology::NatsSecurity::default()).await
    }

    /// A server whose configuration file holds `config` (nats-server's syntax: `accounts {…}`,
    /// `tls {…}`); the port, address and store come from the command line. `admin` is how the
    /// harness connects to see it ready.
    pub async fn start_with(
        config: &str,
        admin: sync_topology::NatsSecurity,
    ) -> anyhow::Result<Self> {
        let store = tempfile::tempdir().context("creating a store directory")?;
        let config = if config.is_empty() {
            None
        } else {
            let path = store.path().join("server.conf");
            std::fs::write(&path, config).context("writing the server's configuration")?;
            Some(path)
        };
        let mut nats = PrivateNats {
            port: free_port()?,
            store,
            child: None,
            config,
            admin,
        };
        nats.start_again().await?;
        Ok(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        let bin = env_var("NATS_SERVER_BIN")?;
        let mut command = Command::new(&bin);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {bin}"))?;
        self.child = Some(child);
        let url = self.url();
        let admin = &self.admin;
        wait_for(
            "private nats-server to accept JetStream requests",
            Duration::from_secs(20),
            || {
                let url = url.clone();
                async move {
                    let client = sync_topology::connect_with(&url, admin, "e2e").await.ok()?;
                    let js = async_nats::jetstream::new(client);
                    js.query_account().await.ok().map(|_| ())
                }
            },
        )
        .await
    }

    /// Stops the server (SIGKILL: the harshest case, as in a crash).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("killing nats-server")?;
        }
        Ok(())
    }

    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.start_again().await
    }
}

/// A PostgreSQL cluster of the test's own, which the test may stop and start. Runs as the
/// `postgres` user when the tests run as root, since PostgreSQL refuses root.
#[derive(Debug)]
pub struct PrivatePostgres {
    pub port: u16,
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    /// Server settings beyond the port and socket (`-c ssl=on …`).
    extra_options: String,
}

impl PrivatePostgres {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_options(String::new(), None).await
    }

    /// A cluster with `ssl=on`, serving `certs`' `server` certificate (for `localhost` and
    /// `127.0.0.1`); clients may still connect without TLS.
    pub async fn start_with_tls(certs: &tls::TestCertificates) -> anyhow::Result<Self> {
        Self::start_with_options(
            "-c ssl=on -c ssl_cert_file=server.pem -c ssl_key_file=server-key.pem".to_owned(),
            Some(certs),
        )
        .await
    }

    async fn start_with_options(
        extra_options: String,
        certs: Option<&tls::TestCertificates>,
    ) -> anyhow::Result<Self> {
        let bin_dir = PathBuf::from(env_var("PG_BIN_DIR")?);
        let dir = tempfile::tempdir().context("creating a cluster directory")?;
        let pg = PrivatePostgres {
            port: free_port()?,
            dir,
            bin_dir,
            extra_options,
        };
        chown_to_postgres(pg.dir.path()).await?;
        let data = pg.data_dir();
        pg.run_as_postgres(
            "initdb",
            &["-D", &data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        )
        .await?;
        if let Some(certs) = certs {
            // Relative names in the settings are read from the data directory, where PostgreSQL
            // wants its key owned by itself and readable by no one else.
            for name in ["server.pem", "server-key.pem"] {
                let target = Path::new(&data).join(name);
                std::fs::copy(certs.dir().join(name), &target)
                    .with_context(|| format!("copying {name} into the cluster"))?;
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))?;
                chown_to_postgres(&target).await?;
            }
        }
        pg.start_again().await?;
        Ok(pg)
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Admin URL (database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub async fn start_again(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} {}",
            self.port,
            self.dir.path().display(),
            self.extra_options
        );
        let log = self.dir.path().join("postgres.log").display().to_string();
        self.run_as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-l",
                &log,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .await
    }

    pub async fn stop(&self) -> anyhow::Result<()> {
        self.run_as_postgres(
            "pg_ctl",
            &["-D", &self.data_dir(), "-m", "fast", "-w", "stop"],
        )
        .await
    }

    async fn run_as_postgres(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let tool_path = self.bin_dir.join(tool);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&tool_path);
            c
        } else {
            Command::new(&tool_path)
        };
        // From /: the postgres user may not enter the test's working directory (a 0700 clone).
        let output = command
            .args(args)
            .current_dir("/")
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", tool_path.display()))?;
        if !output.status.success() {
            bail!(
                "{tool} {args:?} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        let data = self.data_dir();
        let mut command = if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            std::process::Command::new(&pg_ctl)
        };
        let _ = command
            .args(["-D", &data, "-m", "immediate", "stop"])
            .current_dir("/")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn is_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || std::fs::metadata("/proc/self").is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        })
}

async fn chown_to_postgres(path: &Path) -> anyhow::Result<()> {
    if !is_root() {
        return Ok(());
    }
    let status = Command::new("chown")
        .arg("postgres:")
        .arg(path)
        .status()
        .await
        .context("running chown")?;
    if !status.success() {
        bail!("chown postgres {} failed", path.display());
    }
    Ok(())
}

/// Path of one of the workspace's binaries, built by `cargo build` (the Makefile builds them before
/// the tests run).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test binary has no target directory")?;
    let path = profile_dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: run `cargo build --workspace` (make test does) before these tests",
            path.display()
        );
    }
    Ok(path)
}

/// Sends SIGTERM to a child process: the graceful stop a service must handle.
pub fn terminate(child: &Child) -> anyhow::Result<()> {
    let pid = child.id().context("process already exited")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        bail!("kill -TERM {pid} failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            replace_database("postgres://postgres@127.0.0.1:15432/postgres", "t_1"),
            "postgres://postgres@127.0.0.1:15432/t_1"
        );
        assert_eq!(
            replace_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(replace_database("postgres://h:1", "x"), "postgres://h:1/x");
    }
}

#[cfg(test)]
mod infra_tests {
    use super::*;

    #[tokio::test]
    async fn private_servers_start_stop_and_restart() -> anyhow::Result<()> {
        let mut nats = PrivateNats::start().await?;
        nats.restart().await?;
        let pg = PrivatePostgres::start().await?;
        let db = TestDatabase::create_on(&pg.url()).await?;
        let client = db.client().await?;
        client.batch_execute("SELECT 1").await?;
        pg.stop().await?;
        pg.start_again().await?;
        let client = db.client().await?;
        client.batch_execute("SELECT 1").await?;
        Ok(())
    }
}

/// Messages in a stream right now, or None while the server does not answer (a restart).
pub async fn stream_messages(nats_url: &str, stream: &str) -> Option<u64> {
    let client = async_nats::connect(nats_url).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(stream).await.ok()?;
    stream.info().await.ok().map(|info| info.state.messages)
}

/// A client of `nats_url`, which may list several servers of a cluster, comma-separated.
pub async fn connect_nats(nats_url: &str) -> anyhow::Result<async_nats::Client> {
    let servers: Vec<&str> = nats_url.split(',').map(str::trim).collect();
    async_nats::connect(servers.as_slice())
        .await
        .with_context(|| format!("connecting to {nats_url}"))
}

/// For a failing test's message: every message of the ingest stream `stream` about one of `ids`,
/// as `seq {n}: version {load}.{line}, hash {content hash}` in stream order, plus the ledger entry
/// of each id in `ledger_bucket`.
pub async fn ingest_history(
    nats_url: &str,
    stream: &str,
    ledger_bucket: &str,
    ids: &[&str],
) -> anyhow::Result<String> {
    let (js, messages) = every_message(nats_url, stream).await?;
    let mut lines: Vec<(String, String)> = Vec::new();
    for (seq, message) in messages {
        let Ok(decoded) =
            sync_topology::IngestMessage::decode(Some(&message.headers), &message.payload, seq)
        else {
            continue;
        };
        let id = &decoded.message.record.id;
        if ids.contains(&id.as_str()) {
            let copy = decoded
                .message
                .copy_of
                .map_or(String::new(), |of| format!(", copy of seq {of}"));
            lines.push((
                id.clone(),
                format!(
                    "seq {seq}: version {}, hash {}{copy}",
                    decoded.message.version,
                    decoded.hash.as_str()
                ),
            ));
        }
    }
    let ledger = js
        .get_key_value(ledger_bucket)
        .await
        .with_context(|| format!("opening bucket {ledger_bucket}"))?;
    let mut text = String::new();
    for id in ids {
        text.push_str(&format!("{id} in {stream}:\n"));
        for (_, line) in lines.iter().filter(|(i, _)| i == id) {
            text.push_str(&format!("  {line}\n"));
        }
        let entry = match sync_topology::ledger::ledger_key(id) {
            Ok(key) => ledger.get(key).await.ok().flatten(),
            Err(_) => None,
        };
        text.push_str(&format!(
            "  ledger: {}\n",
            entry.map_or("none".to_owned(), |v| String::from_utf8_lossy(&v)
                .into_owned())
        ));
    }
    Ok(text)
}

/// For a failing test's message: the ingest sequences that got more than one outcome in the results
/// stream `stream` (every ingest message must get exactly one), each with its outcomes as
/// `seq {n} {subject} {Nats-Msg-Id}`.
pub async fn repeated_outcomes(nats_url: &str, stream: &str) -> anyhow::Result<String> {
    let (_, messages) = every_message(nats_url, stream).await?;
    let mut by_ingest: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    for (seq, message) in messages {
        let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap_or_default();
        let Some(ingest_seq) = body["ingest_seq"].as_u64() else {
            continue;
        };
        let msg_id = message
            .headers
            .get("Nats-Msg-Id")
            .map_or(String::new(), |v| v.as_str().to_owned());
        by_ingest.entry(ingest_seq).or_default().push(format!(
            "seq {seq} {} {msg_id} {}",
            message.subject,
            body["customer_id"]
                .as_str()
                .or(body["id"].as_str())
                .unwrap_or("")
        ));
    }
    let mut text = String::new();
    for (ingest_seq, outcomes) in by_ingest.iter().filter(|(_, o)| o.len() > 1) {
        text.push_str(&format!(
            "ingest seq {ingest_seq}: {}\n",
            outcomes.join("; ")
        ));
    }
    Ok(text)
}

/// Every message of `stream` with its sequence, read one by one (for small test streams only),
/// and the JetStream context it was read with.
async fn every_message(
    nats_url: &str,
    stream: &str,
) -> anyhow::Result<(
    async_nats::jetstream::Context,
    Vec<(u64, async_nats::jetstream::message::StreamMessage)>,
)> {
    let js = async_nats::jetstream::new(connect_nats(nats_url).await?);
    let mut handle = js
        .get_stream(stream)
        .await
        .with_context(|| format!("looking up stream {stream}"))?;
    let state = handle.info().await?.state.clone();
    let mut messages = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(message) = handle.get_raw_message(seq).await {
            messages.push((seq, message));
        }
    }
    Ok((js, messages))
}
