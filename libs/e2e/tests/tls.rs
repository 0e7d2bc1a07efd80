//! TLS to PostgreSQL and to NATS, against private servers with certificates the test makes: every
//! `sslmode` does what libpq's does, a CA decides whom to trust, a NATS server that verifies clients
//! refuses one without its certificate, and the binaries take all of it from their environment.

use std::time::Duration;

use e2e::pipeline::{PipelineEnv, describe};
use e2e::tls::TestCertificates;
use e2e::{PrivateNats, PrivatePostgres, TestDatabase};
use sync_topology::NatsSecurity;

async fn ssl_in_use(database_url: &str) -> anyhow::Result<bool> {
    let client = sync_store::connect_one(database_url).await?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

fn refused(result: Result<tokio_postgres::Client, sync_store::StoreError>, why: &str) -> String {
    match result {
        Ok(_) => panic!("{why}: the connection should have been refused"),
        Err(err) => err.to_string(),
    }
}

#[tokio::test]
async fn postgres_over_tls_honours_sslmode_and_the_ca() -> anyhow::Result<()> {
    let certs = TestCertificates::generate()?;
    let pg = PrivatePostgres::start_with_tls(&certs).await?;
    let ca = certs.ca_file().display().to_string();
    let url = |query: &str| format!("postgres://postgres@127.0.0.1:{}/postgres?{query}", pg.port);

    // The host name is checked against the certificate, which names 127.0.0.1.
    assert!(ssl_in_use(&url(&format!("sslmode=verify-full&sslrootcert={ca}"))).await?);
    // Encrypted without a CA (libpq's require: no proof of who answers), and clear text on request.
    assert!(ssl_in_use(&url("sslmode=require")).await?);
    assert!(ssl_in_use(&url("sslmode=prefer")).await?);
    assert!(!ssl_in_use(&url("sslmode=disable")).await?);

    // A key-value DSN reaching the server under another name: verify-ca trusts the chain alone,
    // verify-full wants the name.
    let dsn = |mode: &str| {
        format!(
            "host=db.invalid hostaddr=127.0.0.1 port={} user=postgres dbname=postgres \
             sslmode={mode} sslrootcert='{ca}'",
            pg.port
        )
    };
    assert!(ssl_in_use(&dsn("verify-ca")).await?);
    let wrong_name = refused(
        sync_store::connect_one(&dsn("verify-full")).await,
        "verify-full to a name the certificate does not hold",
    );
    assert!(
        wrong_name.contains("certificate") || wrong_name.contains("name"),
        "{wrong_name}"
    );

    // A certificate from a CA we were not told to trust is refused, whichever check is asked for.
    let strangers = TestCertificates::generate()?;
    let other_ca = strangers.ca_file().display().to_string();
    for mode in ["verify-ca", "verify-full", "require"] {
        let err = refused(
            sync_store::connect_one(&url(&format!("sslmode={mode}&sslrootcert={other_ca}"))).await,
            mode,
        );
        assert!(err.contains("certificate"), "{mode}: {err}");
    }

    // The pool the persister uses, and a binary that reads DATABASE_URL: TLS all the way.
    let db =
        TestDatabase::create_on(&url(&format!("sslmode=verify-full&sslrootcert={ca}"))).await?;
    let pool = sync_store::connect_pool(&db.url, 1)?;
    let mut conn = sync_store::connection(&pool, &db.url).await?;
    sync_store::migrate(&mut conn, None).await?;
    drop(conn);
    let env = PipelineEnv::new("nats://127.0.0.1:1", &db.url);
    let out = env.run("syncctl", &["dlq", "list"]).await?;
    assert!(out.status.success(), "{}", describe(&out));
    Ok(())
}

#[tokio::test]
async fn a_server_without_tls_is_refused_when_tls_is_required() -> anyhow::Result<()> {
    // The shared development server runs without TLS.
    let admin = e2e::env_var("DATABASE_URL")?;
    let separator = if admin.contains('?') { '&' } else { '?' };
    let err = refused(
        sync_store::connect_one(&format!("{admin}{separator}sslmode=require")).await,
        "require against a server without TLS",
    );
    assert!(
        err.to_lowercase().contains("tls") || err.contains("SSL"),
        "{err}"
    );
    assert!(!ssl_in_use(&format!("{admin}{separator}sslmode=prefer")).await?);
    Ok(())
}

#[tokio::test]
async fn nats_over_tls_with_a_ca_and_a_client_certificate() -> anyhow::Result<()> {
    let certs = TestCertificates::generate()?;
    let config = format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n  timeout: 2\n}}\n",
        certs.cert("server").display(),
        certs.key("server").display(),
        certs.ca_file().display(),
    );
    let client_tls = NatsSecurity {
        tls_ca: Some(certs.ca_file()),
        tls_cert: Some(certs.cert("client")),
        tls_key: Some(certs.key("client")),
        ..NatsSecurity::default()
    };
    // Ready means the harness connected with the CA and the client certificate.
    let nats = PrivateNats::start_with(&config, client_tls.clone()).await?;
    let url = nats.url();

    let without_certificate = NatsSecurity {
        tls_ca: Some(certs.ca_file()),
        ..NatsSecurity::default()
    };
    let strangers = TestCertificates::generate()?;
    let wrong_ca = NatsSecurity {
        tls_ca: Some(strangers.ca_file()),
        tls_cert: Some(certs.cert("client")),
        tls_key: Some(certs.key("client")),
        ..NatsSecurity::default()
    };
    for (what, security) in [
        ("no client certificate", without_certificate),
        ("a CA that did not sign the server's", wrong_ca),
        ("no TLS settings at all", NatsSecurity::default()),
    ] {
        let attempt = tokio::time::timeout(
            Duration::from_secs(15),
            sync_topology::connect_with(&url, &security, "tls-test"),
        )
        .await?;
        assert!(attempt.is_err(), "{what}: the server should refuse us");
    }
    let missing = NatsSecurity {
        tls_ca: Some(certs.dir().join("missing.pem")),
        ..NatsSecurity::default()
    };
    let err = sync_topology::connect_with(&url, &missing, "tls-test")
        .await
        .expect_err("a CA file that does not exist");
    assert!(err.to_string().contains("missing.pem"), "{err}");

    // The binaries take the same settings from their environment.
    let db = TestDatabase::create().await?;
    let mut env = PipelineEnv::new(&url, &db.url);
    for (key, path) in [
        ("NATS_TLS_CA", certs.ca_file()),
        ("NATS_TLS_CERT", certs.cert("client")),
        ("NATS_TLS_KEY", certs.key("client")),
    ] {
        env.set_env(&["syncctl", "csv-reader"], key, path.display().to_string());
    }
    env.setup().await?;
    let csv = certs.dir().join("two.csv");
    std::fs::write(
        &csv,
        "id,first_name,last_name,email\n1,Ada,Lovelace,ada@example.com\n2,Alan,Turing,alan@example.com\n",
    )?;
    let out = env
        .run(
            "csv-reader",
            &["--summary-json", &csv.display().to_string()],
        )
        .await?;
    assert!(out.status.success(), "{}", describe(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(summary["published"], 2, "{summary}");
    Ok(())
}
