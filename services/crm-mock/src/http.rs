//! Routes, the gate every customer request passes (auth, concurrency cap, quota, latency, faults)
//! and the counters behind `/stats`.

use secrecy::ExposeSecret as _;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use crate::faults::{FaultPlan, InjectedFault};
use crate::store::{Answer, Effect, Store, Write};
use crate::validate::parse_customer;
use crate::{CrmMockConfig, InjectedCounts, Stats};

const IDEMPOTENCY_KEY: &str = "idempotency-key";

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    created: AtomicU64,
    updated: AtomicU64,
    idempotent_replays: AtomicU64,
    duplicate_effects: AtomicU64,
    injected_error: AtomicU64,
    injected_rate_limited: AtomicU64,
    injected_timeout: AtomicU64,
    injected_late_applied: AtomicU64,
    injected_late_landed: AtomicU64,
    concurrency_limited: AtomicU64,
    quota_limited: AtomicU64,
    rejected_auth: AtomicU64,
    rejected_invalid: AtomicU64,
    concurrency_current: AtomicU64,
    concurrency_peak: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The behaviour in force; replaced whole by [`App::reconfigure`], so a request sees one
/// consistent set of settings from its start to its answer.
struct Settings {
    config: CrmMockConfig,
    quota: Option<DefaultDirectRateLimiter>,
    expected_authorization: Option<String>,
}

impl Settings {
    fn new(config: CrmMockConfig) -> Self {
        let quota = config
            .rps
            .and_then(NonZeroU32::new)
            .map(|rps| RateLimiter::direct(Quota::per_second(rps)));
        let expected_authorization = config
            .token
            .as_ref()
            .map(|token| format!("Bearer {}", token.expose_secret()));
        Settings {
            config,
            quota,
            expected_authorization,
        }
    }
}

/// How many duplicate effects `/stats` names.
const DUPLICATES_NAMED: usize = 20;

pub struct App {
    settings: RwLock<Arc<Settings>>,
    duplicate_ids: parking_lot::Mutex<Vec<String>>,
    shutdown: CancellationToken,
    store: Store,
    counters: Counters,
}

impl App {
    pub fn new(config: CrmMockConfig, shutdown: CancellationToken) -> Self {
        App {
            settings: RwLock::new(Arc::new(Settings::new(config))),
            duplicate_ids: parking_lot::Mutex::new(Vec::new()),
            shutdown,
            store: Store::default(),
            counters: Counters::default(),
        }
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings.read().clone()
    }

    pub fn config(&self) -> CrmMockConfig {
        self.settings().config.clone()
    }

    /// Changes faults, limits, token or idempotency for requests that arrive from now on; the
    /// listen address, customers, remembered keys and counters stay. The request numbering goes
    /// on, so a seed keeps giving the same sequence from where it was.
    pub fn reconfigure(&self, config: CrmMockConfig) {
        *self.settings.write() = Arc::new(Settings::new(config));
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            requests: read(&c.requests),
            created: read(&c.created),
            updated: read(&c.updated),
            idempotent_replays: read(&c.idempotent_replays),
            duplicate_effects: read(&c.duplicate_effects),
            duplicate_ids: self.duplicate_ids.lock().clone(),
            customers: self.store.customer_count(),
            injected: InjectedCounts {
                error: read(&c.injected_error),
                rate_limited: read(&c.injected_rate_limited),
                timeout: read(&c.injected_timeout),
                late_applied: read(&c.injected_late_applied),
                late_landed: read(&c.injected_late_landed),
                concurrency_limited: read(&c.concurrency_limited),
                quota_limited: read(&c.quota_limited),
            },
            concurrency_current: read(&c.concurrency_current),
            concurrency_peak: read(&c.concurrency_peak),
            rejected_auth: read(&c.rejected_auth),
            rejected_invalid: read(&c.rejected_invalid),
        }
    }

    fn reset(&self) {
        self.store.clear();
        self.duplicate_ids.lock().clear();
        let c = &self.counters;
        for counter in [
            &c.requests,
            &c.created,
            &c.updated,
            &c.idempotent_replays,
            &c.duplicate_effects,
            &c.injected_error,
            &c.injected_rate_limited,
            &c.injected_timeout,
            &c.injected_late_applied,
            &c.injected_late_landed,
            &c.concurrency_limited,
            &c.quota_limited,
            &c.rejected_auth,
            &c.rejected_invalid,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        // Requests in flight are still in flight; the peak restarts from them.
        c.concurrency_peak
            .store(read(&c.concurrency_current), Ordering::Relaxed);
    }

    fn count(&self, effect: Effect) {
        let c = &self.counters;
        match effect {
            Effect::Created { duplicate } => {
                bump(&c.created);
                if duplicate {
                    bump(&c.duplicate_effects);
                }
            }
            Effect::Updated { duplicate } => {
                bump(&c.updated);
                if duplicate {
                    bump(&c.duplicate_effects);
                }
            }
            Effect::Replayed => bump(&c.idempotent_replays),
            Effect::Refused => {}
        }
    }

    /// Sleeps, unless shutdown comes first: a 30 s hang must not hold up a SIGTERM.
    async fn pause(&self, how_long: Duration) {
        if how_long.is_zero() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(how_long) => {}
            () = self.shutdown.cancelled() => {}
        }
    }
}

/// A request admitted under the concurrency cap; leaving (even by a dropped connection) frees it.
struct InFlight<'a> {
    current: &'a AtomicU64,
}

impl<'a> InFlight<'a> {
    fn enter(counters: &'a Counters, cap: Option<usize>) -> Option<Self> {
        let now = counters.concurrency_current.fetch_add(1, Ordering::AcqRel) + 1;
        if cap.is_some_and(|cap| now > cap as u64) {
            counters.concurrency_current.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        counters.concurrency_peak.fetch_max(now, Ordering::AcqRel);
        Some(InFlight {
            current: &counters.concurrency_current,
        })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.current.fetch_sub(1, Ordering::AcqRel);
    }
}

pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/customers", post(create))
        .route("/customers/{id}", get(fetch).put(update))
        .route_layer(middleware::from_fn_with_state(app.clone(), gate));
    // What a test or an operator reads or clears: behind the token too when one is set (anyone
    // who can reach the mock could otherwise wipe its evidence), but never subject to faults.
    let admin = Router::new()
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .merge(api)
        .merge(admin)
        .route("/healthz", get(|| async { "ok" }))
        .with_state(app)
}

/// Whether the request presents the bearer token the settings ask for (any request when none is
/// set). Compared in constant time, so the answer's timing says nothing of how much matched.
fn authorized(settings: &Settings, headers: &HeaderMap) -> bool {
    let Some(expected) = &settings.expected_authorization else {
        return true;
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .map_or(&b""[..], HeaderValue::as_bytes);
    let expected = expected.as_bytes();
    let differences = presented
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    differences == 0 && presented.len() == expected.len()
}

fn unauthorized(counters: &Counters) -> Response {
    bump(&counters.rejected_auth);
    respond(Answer::error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token",
    ))
}

async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if authorized(&app.settings(), request.headers()) {
        next.run(request).await
    } else {
        unauthorized(&app.counters)
    }
}

fn respond(answer: Answer) -> Response {
    let mut response = Response::new(Body::from(answer.body));
    *response.status_mut() = answer.status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn too_many(retry_after_secs: u64, message: &str) -> Response {
    let mut response = respond(Answer::error(StatusCode::TOO_MANY_REQUESTS, message));
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

/// Everything that happens to a customer request before (and around) its processing.
async fn gate(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let counters = &app.counters;
    let settings = app.settings();
    let config = &settings.config;
    let request_number = counters.requests.fetch_add(1, Ordering::Relaxed);
    if !authorized(&settings, request.headers()) {
        return unauthorized(counters);
    }
    let Some(_in_flight) = InFlight::enter(counters, config.max_concurrency) else {
        bump(&counters.concurrency_limited);
        return too_many(1, "too many concurrent requests");
    };
    if let Some(quota) = &settings.quota
        && quota.check().is_err()
    {
        bump(&counters.quota_limited);
        return too_many(1, "requests-per-second quota exceeded");
    }
    let plan = FaultPlan::for_request(config, request_number);
    app.pause(plan.latency).await;
    match plan.fault {
        None => next.run(request).await,
        Some(InjectedFault::ServerError(status)) => {
            bump(&counters.injected_error);
            respond(Answer::error(status, "injected failure"))
        }
        Some(InjectedFault::RateLimited) => {
            bump(&counters.injected_rate_limited);
            too_many(config.retry_after_secs, "injected rate limit")
        }
        Some(InjectedFault::Timeout { applied_first }) => {
            bump(&counters.injected_timeout);
            if applied_first {
                // The worst case for a client: the change lands, the answer never comes.
                drop(next.run(request).await);
            }
            app.pause(Duration::from_millis(config.hang_ms)).await;
            respond(Answer::error(
                StatusCode::GATEWAY_TIMEOUT,
                "injected timeout",
            ))
        }
        Some(InjectedFault::LateApply) => {
            bump(&counters.injected_late_applied);
            let hang = Duration::from_millis(config.hang_ms);
            // Detached, so it lands even when the client gives up and the connection closes.
            let late = app.clone();
            tokio::spawn(async move {
                late.pause(hang).await;
                drop(next.run(request).await);
                bump(&late.counters.injected_late_landed);
            });
            app.pause(hang).await;
            respond(Answer::error(
                StatusCode::GATEWAY_TIMEOUT,
                "injected timeout (the change lands later)",
            ))
        }
    }
}

/// The key to honour, if any. A key that is not visible ASCII is refused, since a client could not
/// send it back unchanged on a retry.
fn idempotency_key<'h>(app: &App, headers: &'h HeaderMap) -> Result<Option<&'h str>, Answer> {
    if app.settings().config.no_idempotency {
        return Ok(None);
    }
    match headers.get(IDEMPOTENCY_KEY) {
        None => Ok(None),
        Some(value) => match value.to_str() {
            Ok(key) if !key.is_empty() => Ok(Some(key)),
            _ => Err(invalid_answer(
                StatusCode::BAD_REQUEST,
                "Idempotency-Key",
                "header Idempotency-Key must be non-empty visible ASCII",
            )),
        },
    }
}

fn invalid_answer(status: StatusCode, field: &str, error: &str) -> Answer {
    Answer::json(
        status,
        &serde_json::json!({ "error": error, "field": field }),
    )
}

fn invalid(status: StatusCode, field: &str, error: &str) -> Response {
    respond(invalid_answer(status, field, error))
}

fn write(app: &App, write: Write, headers: &HeaderMap, body: Bytes) -> Response {
    let key = match idempotency_key(app, headers) {
        Ok(key) => key,
        Err(refusal) => {
            bump(&app.counters.rejected_invalid);
            return respond(refusal);
        }
    };
    let record = match parse_customer(&body) {
        Ok(record) => record,
        Err(why) => {
            bump(&app.counters.rejected_invalid);
            return invalid(why.status, &why.field, &why.error);
        }
    };
    if let Write::Update { path_id } = &write
        && *path_id != record.id
    {
        bump(&app.counters.rejected_invalid);
        return invalid(
            StatusCode::UNPROCESSABLE_ENTITY,
            "id",
            &format!(
                "body id {:?} differs from the id {path_id:?} in the path",
                record.id
            ),
        );
    }
    let id = record.id.clone();
    let written = app.store.write(write, key, body, record);
    if matches!(
        written.effect,
        Effect::Created { duplicate: true } | Effect::Updated { duplicate: true }
    ) {
        let mut named = app.duplicate_ids.lock();
        if named.len() < DUPLICATES_NAMED {
            named.push(format!("{id} ({})", key.unwrap_or("no key")));
        }
    }
    app.count(written.effect);
    respond(written.answer)
}

async fn create(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    write(&app, Write::Create, &headers, body)
}

async fn update(
    State(app): State<Arc<App>>,
    Path(path_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    write(&app, Write::Update { path_id }, &headers, body)
}

async fn fetch(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    respond(app.store.get(&id))
}

async fn stats(State(app): State<Arc<App>>) -> Json<Stats> {
    Json(app.stats())
}

async fn reset(State(app): State<Arc<App>>) -> impl IntoResponse {
    app.reset();
    respond(Answer::json(
        StatusCode::OK,
        &serde_json::json!({ "reset": true }),
    ))
}
