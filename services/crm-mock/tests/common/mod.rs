//! Starts the real crm-mock in-process on a free port and talks to it over HTTP.
#![allow(dead_code)]

use std::time::Duration;

use anyhow::Context as _;
use crm_mock::{CrmMockConfig, RunningMock, Stats};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub struct Mock {
    pub url: String,
    pub running: Option<RunningMock>,
    pub shutdown: CancellationToken,
    pub http: reqwest::Client,
    /// The mock's token, which `/stats` wants when one is set.
    pub token: Option<String>,
}

impl Mock {
    pub async fn start(config: CrmMockConfig) -> anyhow::Result<Self> {
        let config = CrmMockConfig {
            listen: "127.0.0.1:0".parse().context("loopback address")?,
            ..config
        };
        let shutdown = CancellationToken::new();
        let token = config
            .token
            .as_ref()
            .map(|token| secrecy::ExposeSecret::expose_secret(token).to_owned());
        let running = crm_mock::start(config, shutdown.clone()).await?;
        let http = client(Duration::from_secs(10))?;
        Ok(Mock {
            url: running.url.clone(),
            running: Some(running),
            shutdown,
            http,
            token,
        })
    }

    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    pub async fn stats(&self) -> anyhow::Result<Stats> {
        let mut request = self.http.get(self.at("/stats"));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let stats = request
            .send()
            .await
            .context("GET /stats")?
            .error_for_status()
            .context("GET /stats status")?
            .json::<Stats>()
            .await
            .context("decoding /stats")?;
        Ok(stats)
    }

    pub async fn create(&self, body: &Value, key: Option<&str>) -> anyhow::Result<Reply> {
        let mut request = self.http.post(self.at("/customers")).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        Reply::of(request.send().await.context("POST /customers")?).await
    }

    pub async fn update(&self, id: &str, body: &Value, key: Option<&str>) -> anyhow::Result<Reply> {
        let mut request = self
            .http
            .put(self.at(&format!("/customers/{id}")))
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        Reply::of(request.send().await.context("PUT /customers/{id}")?).await
    }

    pub async fn get(&self, id: &str) -> anyhow::Result<Reply> {
        let response = self
            .http
            .get(self.at(&format!("/customers/{id}")))
            .send()
            .await
            .context("GET /customers/{id}")?;
        Reply::of(response).await
    }

    /// POSTs customers `0..count` (ids prefixed by `prefix`), `parallel` at a time, with the given
    /// client, and returns each answer's status and Retry-After (`None` = transport error).
    pub async fn create_many(
        &self,
        client: &reqwest::Client,
        prefix: &str,
        count: usize,
        parallel: usize,
    ) -> Vec<Option<(u16, Option<String>)>> {
        let url = self.at("/customers");
        futures::stream::iter(0..count)
            .map(|n| {
                let request = client
                    .post(&url)
                    .json(&customer(&format!("{prefix}{n}"), "Ada"));
                async move {
                    let response = request.send().await.ok()?;
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    Some((response.status().as_u16(), retry_after))
                }
            })
            .buffer_unordered(parallel)
            .collect()
            .await
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.running.take() {
            Some(running) => tokio::time::timeout(Duration::from_secs(10), running.stopped())
                .await
                .context("crm-mock did not stop within 10 s of shutdown")?,
            None => Ok(()),
        }
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .context("building the HTTP client")
}

/// The JSON form of a customer record.
pub fn customer(id: &str, first_name: &str) -> Value {
    json!({
        "id": id,
        "first_name": first_name,
        "last_name": "Lovelace",
        "email": format!("{id}@example.com"),
        "attributes": {"tier": "gold"},
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<String>,
}

impl Reply {
    async fn of(response: reqwest::Response) -> anyhow::Result<Self> {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = response.text().await.context("reading the body")?;
        let body = serde_json::from_str(&text)
            .with_context(|| format!("answer with status {status} is not JSON: {text:?}"))?;
        Ok(Reply {
            status,
            body,
            retry_after,
        })
    }
}
