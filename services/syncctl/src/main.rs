//! `syncctl`: parses the command line and dispatches to the library. Exit codes: 0 ok, 1 a runtime
//! failure (or `wait` timed out), 2 a usage mistake; a failure is one line on stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::io::{IsTerminal as _, Write as _};

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use service_kit::NatsArgs;
use sync_store::DEFAULT_DATABASE_URL;
use sync_topology::TopologySettings;
use syncctl::CtlError;

// A multi-threaded allocator: glibc malloc serialises many tokio tasks on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Operate a customer-sync pipeline: set it up, watch it, replay, redrive"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct DatabaseArgs {
    /// PostgreSQL connection URL or key-value DSN; `sslmode` (disable, prefer, require, verify-ca,
    /// verify-full) and `sslrootcert` (a CA file, or `system`) turn TLS on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        hide_env_values = true
    )]
    database_url: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update streams, consumers, KV buckets and the database schema. Idempotent: a
    /// second run reports everything Unchanged.
    Setup(SetupArgs),
    /// Counts per stream, consumer and table, the replicas, and the reconciliation; --watch
    /// refreshes it with rates and an ETA.
    #[command(long_about = STATUS_HELP)]
    Status(StatusArgs),
    /// Block until nothing is pending or in flight on the integrators' and the persister's
    /// consumers (stable over 3 polls). Exit 1 on timeout, naming what is still pending.
    Wait(WaitArgs),
    /// Check content, not counts: every customer's newest version against `customers`, the ledger
    /// and (with --crm) the CRM. Names every customer that differs; exit 1 unless all agree.
    #[command(long_about = VERIFY_HELP)]
    Verify(VerifyArgs),
    /// Remove settled messages older than the retention from both streams (streams never expire
    /// messages by age: a message without its outcome is never removed).
    Prune(PruneArgs),
    /// Delete every stream and bucket of the namespace with their messages (the database is left
    /// alone). Asks for --yes.
    Teardown(TeardownArgs),
    /// One customer's story: every version in the ingest stream with its outcome, the ledger
    /// entry, the customers row, dead letters, rejected rows naming it, and (--crm) the CRM's copy.
    Show(ShowArgs),
    /// Reprocess part of the ingest stream through the integrators, or rebuild the database from the
    /// results stream (--results).
    #[command(long_about = REPLAY_HELP)]
    Replay(ReplayArgs),
    /// Dead letters: list them, or put them back on the ingest path.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Write a realistic customer CSV (streaming, any size, deterministic for a seed). Statistics
    /// go to stderr as JSON.
    GenCsv(GenCsvArgs),
    /// Print nats-server's `accounts` block for a namespace: one user per service with exactly the
    /// permissions its job needs, passwords read from `$NATS_PASSWORD_<USER>` (see the README's
    /// Security section).
    NatsAccounts(NatsAccountsArgs),
}

#[derive(Debug, Args)]
struct NatsAccountsArgs {
    /// Prefix of every subject, stream, consumer and bucket name.
    #[arg(long, env = "SYNC_NAMESPACE", default_value = "customers")]
    namespace: String,
}

const STATUS_HELP: &str = "\
Counts per stream (messages, bytes, first/last sequence), per consumer (pending, in flight = \
ack pending, redelivered, ack floor), rows per table, and the reconciliation. Each equation is \
shown with its difference; `difference` is the sum of their absolute values, 0 when reconciled:

  reader        rows_read = published + deduplicated + rejected   (checkpoints bucket, all files)
  ingest        ingest messages = synced + dead outcomes + integrators pending + in flight
                (every ingest message yields exactly one outcome on synced or dead)
  rejects       rejected outcomes >= rejected by the reader (equal once every file is read, unless
                a file was read again after the dedup window)
  rejected_rows rejected by the reader - persister pending <= rejected_rows <= rejected outcomes
  dead_letters  dead_letters <= dead outcomes (redriven letters leave the table)
  customers     customers <= synced outcomes (one row per customer)

Outcome counts are per subject of the results stream. Each integrator replica is shown from the \
heartbeat it writes every few seconds (breaker, pause, concurrency limit, requests in flight, \
messages in hand, totals); one silent for three heartbeats is `stale`. --json prints the same as \
one JSON object with top-level `difference` and `reconciled`. Exit 0 whether reconciled or not; \
with --check, exit 1 unless reconciled.

--watch refreshes every --interval (2s): the screen is redrawn on a terminal, otherwise one report \
follows another (one JSON object per line with --json), each with the rates since the one before \
(rows read, published, outcomes and stored per second) and how long the integrators' and the \
persister's backlogs take at that pace. Ctrl-C stops it.";

const VERIFY_HELP: &str = "\
For every customer: the newest version the pipeline knows (the newest in the ingest stream, or the \
ledger's confirmed version when that is newer, e.g. after a prune) against the row in `customers` \
(version, content hash, and the hash recomputed from the row's fields) and against the ledger. A \
customer whose newest version is dead-lettered is counted as such (its `customers` row must still \
match the ledger). With --crm, also asks the CRM (GET /customers/{id}) for every customer, or for a \
random --sample of them, and compares its content with what the ledger confirmed.

With --crm, a lookup that fails for a transient reason (5xx, 429, timeout) is tried again, up to 20 \
times and never sooner than the CRM's Retry-After; a customer the CRM still did not answer for is \
NOT VERIFIED.

Exit 0 when every customer agrees and nothing is pending; 1 otherwise (each differing or unverified \
customer is named). Run it after `syncctl wait`: while work is pending, unsettled customers count as pending.";

const REPLAY_HELP: &str = "\
Reprocess part of the ingest stream (by --from-seq/--to-seq or --since/--until) through the \
normal integrator path, by REPUBLISHING the selected messages onto the ingest subject with their \
original headers, a fresh Nats-Msg-Id `replay:{seq}:{nonce}` and `Sync-Replay-Of: {seq}`. The \
running integrators pick them up from their one durable consumer; the ledger skips customers the \
CRM already confirmed with the same hash. --force adds `Sync-Force-Resend: true` so they are sent \
again anyway (e.g. after the CRM lost data). A message whose customer the ledger holds at a later \
version with other content is never republished (that would take the CRM back to old data).

--results instead rebuilds the PostgreSQL tables from the results stream into an (empty) database: \
it migrates the schema, reads every outcome with a fresh consumer and writes them as the persister \
does, stopping when drained.";

#[derive(Debug, Args)]
struct SetupArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Leave the database alone (NATS only).
    #[arg(long)]
    skip_db: bool,
    /// Stream, consumer and bucket replicas: 1 on a single server, 3 on a cluster.
    #[arg(long, default_value_t = TopologySettings::default().replicas,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=5))]
    replicas: usize,
    /// Window in which the ingest stream drops a repeated Nats-Msg-Id.
    #[arg(long, default_value_t = TopologySettings::default().dedup_window.into())]
    dedup_window: humantime::Duration,
    /// How long streams keep settled messages (so they can be replayed) before `syncctl prune`
    /// removes them. Messages without their outcome are kept however old.
    #[arg(long, default_value_t = TopologySettings::default().retention.into())]
    retention: humantime::Duration,
    /// Size limit of each stream in bytes (-1: only the server's JetStream store limit). A full
    /// stream refuses new messages; it never drops old ones.
    #[arg(long, default_value_t = TopologySettings::default().max_stream_bytes, allow_hyphen_values = true)]
    max_stream_bytes: i64,
    /// How long an integrator may hold a message unacknowledged before redelivery.
    #[arg(long, default_value_t = TopologySettings::default().integrator_ack_wait.into())]
    ack_wait: humantime::Duration,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Leave the database out of the status.
    #[arg(long)]
    skip_db: bool,
    /// One JSON object on stdout, for scripts (with --watch, one per line per refresh).
    #[arg(long)]
    json: bool,
    /// Exit 1 unless reconciled (difference 0): for scripts and health checks.
    #[arg(long, conflicts_with = "watch")]
    check: bool,
    /// Refresh every --interval until Ctrl-C, with rates and an ETA for the backlog.
    #[arg(long, env = "SYNCCTL_STATUS_WATCH")]
    watch: bool,
    /// With --watch: time between refreshes (`2s`, `1m`, or seconds).
    #[arg(long, env = "SYNCCTL_STATUS_INTERVAL", default_value = "2s", value_parser = positive_duration)]
    interval: Duration,
}

/// A duration above zero, humantime or seconds.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match service_kit::parse_duration(text)? {
        Duration::ZERO => Err("must be longer than 0".to_owned()),
        duration => Ok(duration),
    }
}

#[derive(Debug, Args)]
struct WaitArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// Where `verify --crm` and `show --crm` ask the CRM, and how they authenticate to it.
#[derive(Debug, Args)]
struct CrmArgs {
    /// Also ask the CRM what it holds.
    #[arg(long)]
    crm: bool,
    /// Base URL of the CRM API.
    #[arg(
        long,
        env = "CRM_URL",
        default_value = "http://127.0.0.1:8080",
        hide_env_values = true,
        value_parser = service_kit::UrlParser
    )]
    crm_url: crm_client::Url,
    /// Bearer token for the CRM API.
    #[arg(long, env = "CRM_API_TOKEN", hide_env_values = true)]
    crm_token: Option<SecretString>,
    /// Send the token over plain http:// to a host other than this machine (a private network).
    #[arg(long, env = "CRM_ALLOW_INSECURE")]
    allow_insecure_crm: bool,
}

impl CrmArgs {
    fn check(self, sample: Option<usize>, concurrency: usize) -> Option<syncctl::verify::CrmCheck> {
        self.crm.then_some(syncctl::verify::CrmCheck {
            url: self.crm_url,
            token: self.crm_token,
            sample,
            concurrency,
            allow_insecure: self.allow_insecure_crm,
            lookup_retries: service_kit::retry::CRM_LOOKUP_RETRIES,
        })
    }
}

#[derive(Debug, Args)]
struct VerifyArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    crm: CrmArgs,
    /// With --crm: check this many customers chosen at random instead of all.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    sample: Option<usize>,
    /// With --crm: requests in flight at once.
    #[arg(long, default_value_t = 32,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    crm_concurrency: usize,
    /// One JSON object on stdout, for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ShowArgs {
    /// The customer id, as in the CSV.
    customer_id: String,
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    crm: CrmArgs,
    /// One JSON object on stdout, for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct PruneArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Remove settled messages older than this (default: the retention `setup` stored).
    #[arg(long, value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
}

#[derive(Debug, Args)]
struct TeardownArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// Yes, delete them: nothing in those streams can be replayed afterwards.
    #[arg(long)]
    yes: bool,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// First ingest stream sequence to replay (inclusive).
    #[arg(long, requires = "to_seq", conflicts_with_all = ["since", "results"])]
    from_seq: Option<u64>,
    /// Last ingest stream sequence to replay (inclusive).
    #[arg(long, requires = "from_seq")]
    to_seq: Option<u64>,
    /// Replay messages stored at or after this time: RFC 3339, or a duration ago (`15m`).
    #[arg(long, conflicts_with = "results")]
    since: Option<String>,
    /// ... and at or before this time (default: now).
    #[arg(long, requires = "since")]
    until: Option<String>,
    /// Send replayed records to the CRM even when the ledger says it already holds them.
    #[arg(long, conflicts_with = "results")]
    force: bool,
    /// Rebuild the database tables from the results stream instead.
    #[arg(long)]
    results: bool,
}

// Parsed once per run: the size of a variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Dead letters, newest first: customer id, hash, CRM status, attempts, when, why.
    List(DlqListArgs),
    /// Republish dead letters onto the ingest subject once the cause is fixed.
    Redrive(DlqRedriveArgs),
}

#[derive(Debug, Args)]
struct DlqListArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..))]
    limit: i64,
    #[arg(long)]
    json: bool,
    /// How long to keep trying PostgreSQL before giving up: `5m`, `90s`, or seconds.
    #[arg(long, env = "STARTUP_WAIT", default_value = "5m", value_parser = service_kit::parse_duration)]
    startup_wait: Duration,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["id", "all"]))]
struct DlqRedriveArgs {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Customer id whose dead letters to redrive.
    #[arg(long)]
    id: Option<String>,
    /// Redrive every dead letter.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Args)]
struct GenCsvArgs {
    /// Data rows (not counting the header).
    #[arg(long, default_value_t = 1000)]
    rows: u64,
    /// Share of rows that are bad (empty id, bad e-mail, wrong field count, over-long field).
    #[arg(long, default_value_t = 0.0)]
    bad_rate: f64,
    /// Share of rows that exactly repeat an earlier valid row.
    #[arg(long, default_value_t = 0.0)]
    dup_rate: f64,
    /// Share of rows that repeat an earlier id with changed content.
    #[arg(long, default_value_t = 0.0)]
    change_rate: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only the required columns and phone (no company, country).
    #[arg(long)]
    no_extra_columns: bool,
    /// File to write, or `-` for stdout.
    #[arg(long, default_value = "-")]
    output: PathBuf,
    /// Also write the statistics as JSON to this file.
    #[arg(long)]
    stats_json: Option<PathBuf>,
}

const PROGRAM: &str = "syncctl";

fn main() -> ExitCode {
    let cli: Cli = service_kit::parse_args(PROGRAM);
    // Connection chatter would drown the output an operator asked for; RUST_LOG brings it back.
    service_kit::init_telemetry_with_default("warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            let err = CtlError::Io {
                action: "starting the async runtime".to_owned(),
                source: err,
            };
            return service_kit::report_failure(PROGRAM, &err, err.exit_code());
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(err) => service_kit::report_failure(PROGRAM, &err, err.exit_code()),
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<(), CtlError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| CtlError::Json {
        what: "output".to_owned(),
        source,
    })?;
    println!("{text}");
    Ok(())
}

async fn dispatch(command: Command) -> Result<ExitCode, CtlError> {
    match command {
        Command::Setup(args) => setup(args).await,
        Command::Status(args) => status(args).await,
        Command::Wait(args) => wait(args).await,
        Command::Verify(args) => verify(args).await,
        Command::Show(args) => show(args).await,
        Command::Prune(args) => prune(args).await,
        Command::Teardown(args) => teardown(args).await,
        Command::Replay(args) => replay(args).await,
        Command::Dlq(DlqCommand::List(args)) => dlq_list(args).await,
        Command::Dlq(DlqCommand::Redrive(args)) => dlq_redrive(args).await,
        Command::NatsAccounts(args) => nats_accounts(&args),
        Command::GenCsv(args) => gen_csv(args).await,
    }
}

async fn setup(args: SetupArgs) -> Result<ExitCode, CtlError> {
    let settings = TopologySettings {
        replicas: args.replicas,
        dedup_window: args.dedup_window.into(),
        retention: args.retention.into(),
        max_stream_bytes: args.max_stream_bytes,
        integrator_ack_wait: args.ack_wait.into(),
        ..TopologySettings::default()
    };
    let config = syncctl::setup::SetupConfig {
        nats: args.nats,
        database_url: (!args.skip_db).then_some(args.database.database_url),
        settings,
    };
    let outcome = syncctl::setup::run(&config).await?;
    print!("{outcome}");
    Ok(ExitCode::SUCCESS)
}

async fn status(args: StatusArgs) -> Result<ExitCode, CtlError> {
    let config = syncctl::status::StatusConfig {
        nats: args.nats,
        database_url: (!args.skip_db).then_some(args.database.database_url),
    };
    if args.watch {
        return watch_status(config, args.interval, args.json).await;
    }
    let status = syncctl::status::collect(&config).await?;
    if args.json {
        print_json(&status)?;
    } else {
        print!("{status}");
    }
    Ok(if args.check && !status.reconciled {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

async fn wait(args: WaitArgs) -> Result<ExitCode, CtlError> {
    let drained =
        syncctl::wait::run(&syncctl::wait::WaitConfig::new(args.nats, args.timeout)).await?;
    println!(
        "drained: nothing pending or in flight (waited {:.1}s)",
        drained.waited.as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

async fn show(args: ShowArgs) -> Result<ExitCode, CtlError> {
    let story = syncctl::show::run(&syncctl::show::ShowConfig {
        nats: args.nats,
        database_url: args.database.database_url,
        customer_id: args.customer_id,
        crm: args.crm.check(None, 1),
    })
    .await?;
    if args.json {
        print_json(&story)?;
    } else {
        print!("{story}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn prune(args: PruneArgs) -> Result<ExitCode, CtlError> {
    let report = syncctl::prune::run(&syncctl::prune::PruneConfig {
        nats: args.nats,
        older_than: args.older_than,
    })
    .await?;
    print!("{}", syncctl::prune::Printed(&report));
    Ok(ExitCode::SUCCESS)
}

async fn teardown(args: TeardownArgs) -> Result<ExitCode, CtlError> {
    if !args.yes {
        return Err(CtlError::Usage(format!(
            "teardown deletes every stream and bucket of namespace {:?} with their messages; \
             add --yes to do it",
            args.nats.namespace
        )));
    }
    let report = syncctl::teardown::run(&args.nats).await?;
    print!("{}", syncctl::teardown::Printed(&report));
    Ok(ExitCode::SUCCESS)
}

async fn dlq_list(args: DlqListArgs) -> Result<ExitCode, CtlError> {
    let rows = syncctl::dlq::list(&syncctl::dlq::ListConfig {
        database_url: args.database.database_url,
        limit: args.limit,
        startup_wait: args.startup_wait,
    })
    .await?;
    if args.json {
        print_json(&rows)?;
    } else {
        print!("{}", syncctl::dlq::Listing(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

async fn dlq_redrive(args: DlqRedriveArgs) -> Result<ExitCode, CtlError> {
    let selection = match args.id {
        Some(id) => syncctl::dlq::RedriveSelection::Customer(id),
        None => syncctl::dlq::RedriveSelection::All,
    };
    let outcome = syncctl::dlq::redrive(&syncctl::dlq::RedriveConfig {
        nats: args.nats,
        database_url: args.database.database_url,
        selection,
    })
    .await?;
    println!(
        "redrove {} dead letter(s) onto the ingest subject",
        outcome.republished
    );
    if !outcome.superseded.is_empty() {
        eprintln!(
            "left alone: {} dead letter(s) whose customer the CRM already holds at a later \
             version: {}",
            outcome.superseded.len(),
            outcome.superseded.join(", ")
        );
    }
    if !outcome.without_record.is_empty() {
        eprintln!(
            "warning: {} dead letter(s) have no stored record and stay: {}",
            outcome.without_record.len(),
            outcome.without_record.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn nats_accounts(args: &NatsAccountsArgs) -> Result<ExitCode, CtlError> {
    let names = sync_topology::Names::new(&args.namespace)?;
    let passwords = sync_topology::auth::Passwords::FromEnvironment;
    print!(
        "{}",
        sync_topology::auth::accounts_config(&names, passwords)
    );
    Ok(ExitCode::SUCCESS)
}

async fn gen_csv(args: GenCsvArgs) -> Result<ExitCode, CtlError> {
    let config = syncctl::gen_csv::GenCsvConfig {
        options: syncctl::gen_csv::GenOptions {
            rows: args.rows,
            bad_rate: args.bad_rate,
            dup_rate: args.dup_rate,
            change_rate: args.change_rate,
            seed: args.seed,
            extra_columns: !args.no_extra_columns,
        },
        output: if args.output.as_os_str() == "-" {
            syncctl::gen_csv::Output::Stdout
        } else {
            syncctl::gen_csv::Output::File(args.output)
        },
        stats_json: args.stats_json,
    };
    let stats = tokio::task::spawn_blocking(move || syncctl::gen_csv::run(&config))
        .await
        .map_err(|err| CtlError::Io {
            action: "generating the CSV".to_owned(),
            source: std::io::Error::other(err),
        })??;
    let json = serde_json::to_string(&stats).map_err(|source| CtlError::Json {
        what: "generator statistics".to_owned(),
        source,
    })?;
    eprintln!("{json}");
    Ok(ExitCode::SUCCESS)
}

/// `status --watch`: a frame every `interval` until Ctrl-C. A frame that cannot be read (NATS
/// restarting) is reported on one line and tried again at the next refresh.
async fn watch_status(
    config: syncctl::status::StatusConfig,
    interval: Duration,
    json: bool,
) -> Result<ExitCode, CtlError> {
    let shutdown = service_kit::shutdown_on_signals();
    let redraw = std::io::stdout().is_terminal() && !json;
    let mut watcher = syncctl::status::Watcher::new(config);
    loop {
        let frame = tokio::select! {
            () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
            frame = watcher.next() => frame,
        };
        match frame {
            Ok(frame) if json => {
                let line = serde_json::to_string(&frame).map_err(|source| CtlError::Json {
                    what: "output".to_owned(),
                    source,
                })?;
                println!("{line}");
            }
            Ok(frame) if redraw => print!("\x1b[2J\x1b[H{frame}"),
            Ok(frame) => println!("{frame}"),
            Err(err) => {
                service_kit::report_failure(PROGRAM, &err, err.exit_code());
            }
        }
        let _ = std::io::stdout().flush();
        tokio::select! {
            () = shutdown.cancelled() => return Ok(ExitCode::SUCCESS),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

async fn verify(args: VerifyArgs) -> Result<ExitCode, CtlError> {
    let crm = args.crm.check(args.sample, args.crm_concurrency);
    let report = syncctl::verify::run(&syncctl::verify::VerifyConfig {
        nats: args.nats,
        database_url: args.database.database_url,
        crm,
    })
    .await?;
    if args.json {
        print_json(&report)?;
    } else {
        print!("{report}");
    }
    Ok(if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn replay(args: ReplayArgs) -> Result<ExitCode, CtlError> {
    use syncctl::replay::{ReplayConfig, Selection, parse_time};
    if args.results {
        let config = syncctl::rebuild::RebuildConfig {
            nats: args.nats,
            database_url: args.database.database_url,
        };
        let outcome = syncctl::rebuild::run(&config, service_kit::shutdown_on_signals()).await?;
        let t = &outcome.tables;
        println!(
            "rebuilt from {} outcome(s) in {} batch(es): customers {}, rejected_rows {}, \
             dead_letters {} (schema version {})",
            outcome.report.messages_acked,
            outcome.report.batches,
            t.customers,
            t.rejected_rows,
            t.dead_letters,
            outcome.schema_version
        );
        return Ok(ExitCode::SUCCESS);
    }
    let now = chrono::Utc::now();
    let selection = match (args.from_seq, args.to_seq, args.since) {
        (Some(from), Some(to), None) => Selection::Sequences { from, to },
        (None, None, Some(since)) => Selection::Times {
            since: parse_time(&since, now).map_err(CtlError::Usage)?,
            until: match args.until {
                Some(until) => parse_time(&until, now).map_err(CtlError::Usage)?,
                None => now,
            },
        },
        _ => {
            return Err(CtlError::Usage(
                "choose the range: --from-seq A --to-seq B, or --since TIME [--until TIME], or --results"
                    .to_owned(),
            ));
        }
    };
    if args.force {
        eprintln!(
            "WARNING: --force: every replayed record will be SENT TO THE CRM AGAIN, even those the \
             CRM already confirmed with the same content"
        );
    }
    let outcome =
        syncctl::replay::run(&ReplayConfig::new(args.nats, selection, args.force)).await?;
    match (outcome.first_seq, outcome.last_seq) {
        (Some(first), Some(last)) => println!(
            "republished {} message(s) (original sequences {first}..={last}){}",
            outcome.republished,
            if outcome.forced { ", forced" } else { "" }
        ),
        _ => println!("republished 0 messages"),
    }
    if outcome.skipped_superseded > 0 {
        println!(
            "left out {} message(s) whose customer the CRM already holds at a later version",
            outcome.skipped_superseded
        );
    }
    Ok(ExitCode::SUCCESS)
}
