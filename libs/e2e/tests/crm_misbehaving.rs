//! End to end, a CRM that misbehaves: one that answers 200 with something that is not JSON (never
//! counted as a success: the record is dead-lettered with the reason once its deliveries are
//! spent), and one that refuses our token (nothing is dead-lettered for it; the integrator says to
//! check the token and keeps the records until it is fixed).

use std::time::Duration;

use e2e::pipeline::{MockFaults, Pipeline, PipelineEnv, Service, describe};
use e2e::{TestDatabase, nats_url, stream_messages, wait_for};
use sync_topology::Names;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// An HTTP server that answers every request `200 OK` with an HTML page.
async fn html_server() -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                while let Ok(n) = socket.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    let body = "<html>maintenance</html>";
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if socket.write_all(answer.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(url)
}

async fn read_one(env: &PipelineEnv) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("one.csv");
    std::fs::write(
        &file,
        "id,first_name,last_name,email\n1,Ann,Lee,ann@example.com\n",
    )?;
    let out = env
        .run("csv-reader", &[&file.display().to_string()])
        .await?;
    anyhow::ensure!(out.status.success(), "{}", describe(&out));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_that_is_not_json_is_a_failure_not_a_success() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let env = PipelineEnv::new(&nats_url()?, &db.url);
    env.setup().await?;
    let crm = html_server().await?;
    let logs = tempfile::tempdir()?;
    let mut integrator = Service::spawn(
        &env,
        "crm-integrator",
        &[
            "--crm-url".into(),
            crm,
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--max-deliver".into(),
            "1".into(),
        ],
        logs.path(),
        "crm-integrator",
    )
    .await?;
    read_one(&env).await?;
    let names = Names::new(&env.namespace)?;
    let client = async_nats::connect(&env.nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let dead_subject = names.dead_subject();
    let dead = wait_for(
        "the record to be dead-lettered",
        Duration::from_secs(60),
        || {
            let (js, results, dead_subject) =
                (js.clone(), names.results_stream(), dead_subject.clone());
            async move {
                let stream = js.get_stream(results).await.ok()?;
                let message = stream
                    .get_last_raw_message_by_subject(&dead_subject)
                    .await
                    .ok()?;
                serde_json::from_slice::<sync_topology::messages::DeadLetter>(&message.payload).ok()
            }
        },
    )
    .await?;
    assert!(dead.reason.contains("JSON"), "{dead:?}");
    let synced = js
        .get_stream(names.results_stream())
        .await?
        .get_last_raw_message_by_subject(&names.synced_subject())
        .await;
    assert!(synced.is_err(), "nothing counted as synced");
    integrator.stop(Duration::from_secs(30)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_dead_letters_nothing_and_says_to_check_the_token() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    let env = PipelineEnv::new(&nats_url()?, &db.url);
    let mut pipeline = Pipeline::start(
        env.clone(),
        MockFaults::default(),
        1,
        &["--crm-token", "not-the-token"],
    )
    .await?;
    read_one(&env).await?;
    let log = pipeline.integrators[0].log.clone();
    wait_for(
        "the integrator to name the token",
        Duration::from_secs(30),
        || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).ok()?;
                text.contains("CRM_API_TOKEN").then_some(())
            }
        },
    )
    .await?;
    let stats = pipeline.crm_stats().await?;
    assert_eq!(stats["created"], 0, "{stats:#}");
    assert!(
        stats["rejected_auth"].as_u64().unwrap_or(0) > 0,
        "{stats:#}"
    );
    let names = Names::new(&env.namespace)?;
    assert_eq!(
        stream_messages(&env.nats_url, &names.results_stream()).await,
        Some(0),
        "not dead-lettered for a wrong token"
    );
    pipeline.integrators[0].kill().await?;
    pipeline.integrators.clear();
    pipeline.stop().await
}
