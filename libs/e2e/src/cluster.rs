//! A 3-node JetStream cluster of the test's own on loopback ports, started from the repository's
//! own node configurations (`deploy/nats-cluster/n{1,2,3}.conf`, the compose cluster's): ports and
//! routes are overridden on the command line, the store directory (which nats-server does not let
//! `-sd` override once the file sets it) is rewritten in a copy of the file. A node can be killed and
//! restarted on the same ports and store, and a stream's leader can be made to step down.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::{env_var, free_port, wait_for, workspace_root};

const NODES: usize = 3;

/// One node's ports and process.
#[derive(Debug)]
struct Node {
    name: String,
    client_port: u16,
    cluster_port: u16,
    monitor_port: u16,
    child: Option<Child>,
}

/// Three nats-servers forming one JetStream cluster.
#[derive(Debug)]
pub struct PrivateNatsCluster {
    nodes: Vec<Node>,
    store: tempfile::TempDir,
    bin: String,
    http: reqwest::Client,
}

impl PrivateNatsCluster {
    /// Starts the three nodes and waits until every one of them is healthy (JetStream enabled and
    /// in contact with a meta leader), so `syncctl setup --replicas 3` can run at once.
    pub async fn start() -> anyhow::Result<Self> {
        let mut nodes = Vec::with_capacity(NODES);
        for i in 1..=NODES {
            nodes.push(Node {
                name: format!("n{i}"),
                client_port: free_port()?,
                cluster_port: free_port()?,
                monitor_port: free_port()?,
                child: None,
            });
        }
        let mut cluster = PrivateNatsCluster {
            nodes,
            store: tempfile::Builder::new()
                .prefix("e2e-nats-cluster-")
                .disable_cleanup(std::env::var_os("E2E_KEEP_LOGS").is_some())
                .tempdir()
                .context("creating the cluster's store directory")?,
            bin: env_var("NATS_SERVER_BIN")?,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .context("building an HTTP client")?,
        };
        for index in 0..NODES {
            cluster.spawn(index)?;
        }
        for index in 0..NODES {
            cluster.wait_healthy(index).await?;
        }
        Ok(cluster)
    }

    /// Every node's client URL, comma-separated: what the services take as `NATS_URL`.
    pub fn url(&self) -> String {
        self.node_urls().join(",")
    }

    fn node_urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.node_url(i)).collect()
    }

    /// A client of the cluster, connected to any node that answers.
    async fn connect(&self) -> anyhow::Result<async_nats::Client> {
        let urls = self.node_urls();
        async_nats::connect(urls.as_slice())
            .await
            .with_context(|| format!("connecting to the cluster at {}", self.url()))
    }

    /// One node's client URL.
    pub fn node_url(&self, index: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[index].client_port)
    }

    /// The index of the node called `name` (`n1`, `n2`, `n3`).
    pub fn index_of(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node called {name} in this cluster"))
    }

    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let routes = self
            .nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect::<Vec<_>>()
            .join(",");
        let node = &self.nodes[index];
        let store: PathBuf = self.store.path().join(&node.name);
        let config = node_config(&node.name, &store, self.store.path())?;
        let log = std::fs::File::create(self.store.path().join(format!("{}.log", node.name)))
            .with_context(|| format!("creating {}'s log", node.name))?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&config)
            .args(["-a", "127.0.0.1", "-p", &node.client_port.to_string()])
            .args(["-m", &node.monitor_port.to_string()])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", node.cluster_port),
            ])
            .args(["--routes", &routes])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} as node {}", self.bin, node.name))?;
        self.nodes[index].child = Some(child);
        Ok(())
    }

    /// Waits for the node's full `/healthz`: JetStream on, a meta leader known, and every stream
    /// and consumer it holds caught up with its group.
    pub async fn wait_healthy(&self, index: usize) -> anyhow::Result<()> {
        let node = &self.nodes[index];
        let url = format!("http://127.0.0.1:{}/healthz", node.monitor_port);
        let healthy = wait_for(
            &format!("cluster node {} to report healthy at {url}", node.name),
            Duration::from_secs(60),
            || {
                let (http, url) = (self.http.clone(), url.clone());
                async move {
                    let response = http.get(url).send().await.ok()?;
                    response.status().is_success().then_some(())
                }
            },
        )
        .await;
        healthy.map_err(|err| {
            let log = std::fs::read_to_string(self.store.path().join(format!("{}.log", node.name)))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::anyhow!("{err:#}; the end of its log:\n{}", tail.join("\n"))
        })
    }

    /// SIGKILL, as in a crash: the node's store stays for its restart.
    pub async fn kill(&mut self, index: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[index].child.take() {
            child
                .kill()
                .await
                .with_context(|| format!("killing node {}", self.nodes[index].name))?;
        }
        Ok(())
    }

    /// Starts a killed node again on its ports and store, and waits until it is healthy again.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        self.spawn(index)?;
        self.wait_healthy(index).await
    }

    /// The name of the node leading `stream` right now, asked of any node that answers.
    pub async fn stream_leader(&self, stream: &str) -> Option<String> {
        let client = self.connect().await.ok()?;
        let js = async_nats::jetstream::new(client);
        let mut handle = js.get_stream(stream).await.ok()?;
        let info = handle.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    }

    /// Makes `stream`'s leader step down (`$JS.API.STREAM.LEADER.STEPDOWN.<stream>`) and waits
    /// until another node leads it. Returns the old and the new leader.
    pub async fn step_down(&self, stream: &str) -> anyhow::Result<(String, String)> {
        let old = wait_for(
            &format!("stream {stream} to have a leader"),
            Duration::from_secs(30),
            || self.stream_leader(stream),
        )
        .await?;
        let client = self.connect().await?;
        let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
        let reply = client
            .request(subject.clone(), Default::default())
            .await
            .with_context(|| format!("requesting {subject}"))?;
        let answer: serde_json::Value = serde_json::from_slice(&reply.payload)
            .with_context(|| format!("parsing the answer to {subject}"))?;
        if answer["success"] != true {
            bail!("{subject} refused: {answer}");
        }
        let new = wait_for(
            &format!("stream {stream} to elect a leader other than {old}"),
            Duration::from_secs(30),
            || {
                let old = old.clone();
                async move { self.stream_leader(stream).await.filter(|l| *l != old) }
            },
        )
        .await?;
        Ok((old, new))
    }

    /// Where the nodes' stores and logs are (`n1.log` …), for a failing test to show.
    pub fn store_dir(&self) -> PathBuf {
        self.store.path().to_path_buf()
    }
}

/// The repository's configuration of node `name` with its `store_dir` pointed at `store`, written
/// into `dir`; returns the copy's path.
fn node_config(name: &str, store: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let source = workspace_root().join(format!("deploy/nats-cluster/{name}.conf"));
    let text = std::fs::read_to_string(&source)
        .with_context(|| format!("reading {}", source.display()))?;
    let mut replaced = false;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("store_dir:") {
                replaced = true;
                format!("  store_dir: {:?}", store.display().to_string())
            } else {
                line.to_owned()
            }
        })
        .collect();
    if !replaced {
        bail!(
            "{} has no store_dir line to point at the test's store",
            source.display()
        );
    }
    let copy = dir.join(format!("{name}.conf"));
    std::fs::write(&copy, lines.join("\n"))
        .with_context(|| format!("writing {}", copy.display()))?;
    Ok(copy)
}
