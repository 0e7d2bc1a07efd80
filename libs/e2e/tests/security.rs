//! NATS with one user per service (the permissions of `sync_topology::auth`), on a private server
//! the test configures: the whole pipeline runs with each binary logged in as its own user, and
//! every user is refused what is not its job, as an attacker holding its password would try it.
//! The reference configuration in deploy/nats loads.

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use e2e::pipeline::{MockFaults, Pipeline, PipelineEnv, describe};
use e2e::{PrivateNats, TestDatabase, wait_for, workspace_root};
use secrecy::SecretString;
use sync_topology::Names;
use sync_topology::auth::{self, ADMIN, INTEGRATOR, PERSISTER, Passwords, READER};

fn password(user: &str) -> String {
    // Fixed per test run, distinct per user.
    format!("pw-{user}-{:08x}", std::process::id())
}

fn login(user: &str) -> sync_topology::NatsSecurity {
    sync_topology::NatsSecurity {
        user: Some(user.to_owned()),
        password: Some(SecretString::from(password(user))),
        ..Default::default()
    }
}

/// A connection as one user that collects the server's refusals ("Permissions Violation for
/// Publish to …"), so a test can wait for the refusal itself rather than for a silence.
struct Session {
    client: async_nats::Client,
    refusals: Arc<Mutex<Vec<String>>>,
}

impl Session {
    async fn open(url: &str, user: &str) -> anyhow::Result<Self> {
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let sink = refusals.clone();
        let client =
            async_nats::ConnectOptions::with_user_and_password(user.to_owned(), password(user))
                .custom_inbox_prefix(sync_topology::inbox_prefix(user))
                .event_callback(move |event| {
                    let sink = sink.clone();
                    async move {
                        if let async_nats::Event::ServerError(err) = event {
                            sink.lock().push(err.to_string());
                        }
                    }
                })
                .connect(url)
                .await?;
        Ok(Session { client, refusals })
    }

    async fn refused(&self, what: &str, subject: &str) -> anyhow::Result<()> {
        let needle = format!("{what} to \"{subject}\"").to_lowercase();
        let refusals = self.refusals.clone();
        wait_for(
            &format!("the server to refuse {what} to {subject}"),
            Duration::from_secs(5),
            || {
                let found = refusals
                    .lock()
                    .iter()
                    .any(|e| e.to_lowercase().contains(&needle));
                async move { found.then_some(()) }
            },
        )
        .await
    }

    /// Publishes a forged message to `subject` and waits for the server's refusal.
    async fn publish_refused(&self, subject: &str) -> anyhow::Result<()> {
        self.client
            .publish(subject.to_owned(), "forged".into())
            .await?;
        self.client.flush().await?;
        self.refused("publish", subject).await
    }

    async fn subscribe_refused(&self, subject: &str) -> anyhow::Result<()> {
        let _subscription = self.client.subscribe(subject.to_owned()).await?;
        self.client.flush().await?;
        self.refused("subscription", subject).await
    }
}

/// Rows with an `updated_at` column: read with `--version-column`, their versions are stamped by
/// the data, which the persister checks against the ingest stream (so its permissions are used).
fn csv_of(customers: usize) -> String {
    let mut text = String::from("id,first_name,last_name,email,updated_at\n");
    for n in 0..customers {
        text.push_str(&format!(
            "c-{n},Ada,Lovelace,ada{n}@example.com,2026-01-01 00:00:{:02}\n",
            n % 60
        ));
    }
    text
}

#[tokio::test]
async fn each_service_works_as_its_own_user_and_is_refused_the_rest() -> anyhow::Result<()> {
    let db = TestDatabase::create().await?;
    // The namespace is the pipeline's, so the permissions name its subjects.
    let mut env = PipelineEnv::new("nats://127.0.0.1:1", &db.url);
    let names = Names::new(&env.namespace)?;
    let literal = |user: &str| password(user);
    let config = auth::accounts_config(&names, Passwords::Literal(&literal));
    let nats = PrivateNats::start_with(&config, login(ADMIN)).await?;
    let url = nats.url();
    env.nats_url = url.clone();
    for (binary, user) in [
        ("syncctl", ADMIN),
        ("csv-reader", READER),
        ("crm-integrator", INTEGRATOR),
        ("persister", PERSISTER),
    ] {
        env.set_env(&[binary], "NATS_USER", user);
        env.set_env(&[binary], "NATS_PASSWORD", password(user));
    }

    // The whole pipeline, each binary as its own user.
    let pipeline = Pipeline::start(env, MockFaults::default(), 1, &[]).await?;
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), csv_of(40))?;
    let out = pipeline
        .env
        .run(
            "csv-reader",
            &[
                "--version-column",
                "updated_at",
                &file.path().display().to_string(),
            ],
        )
        .await?;
    assert!(out.status.success(), "{}", describe(&out));
    pipeline.wait_drained(Duration::from_secs(60)).await?;
    pipeline.verify().await?;
    // Working is not enough: no service may have been refused anything on the way (a refused
    // watch or lookup is only a warning in its log).
    let reader_output = describe(&out);
    for (name, text) in std::iter::once(("csv-reader".to_owned(), reader_output)).chain(
        std::iter::once(&pipeline.persister)
            .chain(&pipeline.integrators)
            .map(|s| {
                (
                    s.name.clone(),
                    std::fs::read_to_string(&s.log).unwrap_or_default(),
                )
            }),
    ) {
        assert!(
            !text.contains("Permissions Violation"),
            "{name} was refused something it needs:\n{text}"
        );
    }
    let stats = pipeline.crm_stats().await?;
    assert_eq!(stats["created"], 40, "{stats}");
    assert_eq!(stats["duplicate_effects"], 0, "{stats}");
    let stored: i64 = db
        .client()
        .await?
        .query_one("SELECT count(*) FROM customers", &[])
        .await?
        .get(0);
    assert_eq!(stored, 40);

    // Nobody gets in without a user, nor with another user's password.
    let anonymous = sync_topology::NatsSecurity::default();
    assert!(
        sync_topology::connect_with(&url, &anonymous, "anonymous")
            .await
            .is_err()
    );
    let mut wrong = login(READER);
    wrong.password = Some(SecretString::from(password(INTEGRATOR)));
    assert!(
        sync_topology::connect_with(&url, &wrong, "csv-reader")
            .await
            .is_err()
    );

    let ingest = names.ingest_stream();
    let results = names.results_stream();
    let ledger = names.ledger_bucket();
    let forged_key = "forged-customer";

    // The reader: no outcomes, no ledger (neither write nor read), no streams, no one's replies.
    let reader = Session::open(&url, READER).await?;
    reader.publish_refused(&names.synced_subject()).await?;
    reader
        .publish_refused(&format!("$KV.{ledger}.{forged_key}"))
        .await?;
    reader
        .publish_refused(&format!("$JS.API.DIRECT.GET.KV_{ledger}.$KV.{ledger}.c-1"))
        .await?;
    reader
        .publish_refused(&format!("$JS.API.STREAM.DELETE.{ingest}"))
        .await?;
    reader
        .subscribe_refused(&format!("{}.>", sync_topology::inbox_prefix(INTEGRATOR)))
        .await?;
    reader.subscribe_refused(&names.ingest_subject()).await?;

    // An integrator: no stream management, no ingest, no checkpoints, not the persister's queue.
    let integrator = Session::open(&url, INTEGRATOR).await?;
    for subject in [
        format!("$JS.API.STREAM.DELETE.{ingest}"),
        format!("$JS.API.STREAM.PURGE.{results}"),
        format!("$JS.API.CONSUMER.DELETE.{ingest}.integrators"),
        names.ingest_subject(),
        format!("$KV.{}.load-counter", names.checkpoints_bucket()),
        format!("$JS.API.CONSUMER.MSG.NEXT.{results}.persister"),
    ] {
        integrator.publish_refused(&subject).await?;
    }

    // The persister: reads outcomes, writes nothing to NATS.
    let persister = Session::open(&url, PERSISTER).await?;
    for subject in [
        names.synced_subject(),
        names.ingest_subject(),
        format!("$KV.{ledger}.{forged_key}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{ingest}.integrators"),
    ] {
        persister.publish_refused(&subject).await?;
    }

    // None of it reached anything: the streams and the ledger are as the pipeline left them.
    let admin = sync_topology::connect_with(&url, &login(ADMIN), "syncctl").await?;
    let js = async_nats::jetstream::new(admin);
    let mut ingest_stream = js.get_stream(&ingest).await?;
    assert_eq!(ingest_stream.info().await?.state.messages, 40);
    let mut results_stream = js.get_stream(&results).await?;
    assert_eq!(results_stream.info().await?.state.messages, 40);
    let ledger = js.get_key_value(&ledger).await?;
    assert!(ledger.get(forged_key).await?.is_none());
    pipeline.stop().await
}

#[tokio::test]
async fn the_reference_configuration_loads() -> anyhow::Result<()> {
    // deploy/nats/secure.conf as shipped, with the TLS files and the store of this test.
    let certs = e2e::tls::TestCertificates::generate()?;
    let dir = tempfile::tempdir()?;
    let deploy = workspace_root().join("deploy/nats");
    let secure = std::fs::read_to_string(deploy.join("secure.conf"))?
        .replace("/etc/nats/tls/", &format!("{}/", certs.dir().display()))
        .replace(
            "/data/jetstream",
            &dir.path().join("js").display().to_string(),
        );
    std::fs::write(dir.path().join("secure.conf"), secure)?;
    std::fs::copy(
        deploy.join("accounts.conf"),
        dir.path().join("accounts.conf"),
    )?;
    let mut check = tokio::process::Command::new(e2e::env_var("NATS_SERVER_BIN")?);
    check
        .arg("-t")
        .arg("-c")
        .arg(dir.path().join("secure.conf"));
    for user in [READER, INTEGRATOR, PERSISTER, ADMIN] {
        check.env(auth::password_variable(user), password(user));
    }
    let out = check.output().await?;
    assert!(out.status.success(), "{}", describe(&out));
    // Without the passwords in its environment the server refuses to start.
    let out = tokio::process::Command::new(e2e::env_var("NATS_SERVER_BIN")?)
        .arg("-t")
        .arg("-c")
        .arg(dir.path().join("secure.conf"))
        .env_remove(auth::password_variable(PERSISTER))
        .output()
        .await?;
    assert!(!out.status.success(), "{}", describe(&out));
    Ok(())
}

#[tokio::test]
async fn a_service_logs_in_with_an_nkey_seed_file() -> anyhow::Result<()> {
    let user = nkeys::KeyPair::new_user();
    let dir = tempfile::tempdir()?;
    let seed_file = dir.path().join("reader.nk");
    std::fs::write(&seed_file, format!("{}\n", user.seed()?))?;
    let config = format!(
        "authorization {{\n  users: [ {{ nkey: \"{}\" }} ]\n}}\n",
        user.public_key()
    );
    let security = sync_topology::NatsSecurity {
        nkey_file: Some(seed_file.clone()),
        ..Default::default()
    };
    let nats = PrivateNats::start_with(&config, security).await?;
    // The binaries read the seed file's path from NATS_NKEY: the seed is never in the environment.
    let db = TestDatabase::create().await?;
    let mut env = PipelineEnv::new(&nats.url(), &db.url);
    env.set_env(&["syncctl"], "NATS_NKEY", seed_file.display().to_string());
    env.run("syncctl", &["setup", "--skip-db"])
        .await
        .and_then(|out| {
            anyhow::ensure!(out.status.success(), "{}", describe(&out));
            Ok(())
        })?;
    let other = nkeys::KeyPair::new_user();
    std::fs::write(&seed_file, other.seed()?)?;
    // A refused login is not a server still starting: it fails at once, not after --startup-wait.
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        env.run("syncctl", &["setup", "--skip-db", "--startup-wait", "1h"]),
    )
    .await
    .map_err(|_| anyhow::anyhow!("a refused nkey was retried as if NATS were not up yet"))??;
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("authorization"),
        "{}",
        describe(&refused)
    );
    Ok(())
}
