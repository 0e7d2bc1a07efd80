//! The CRM's HTTP API as this product sees it: create, update and look up a customer, and the
//! classification of every answer into success, "try again", "refused for good" and "refused our
//! credentials". The integrator sends through it; `syncctl verify --crm` reads through it; the
//! benchmark's reference driver sends the same requests through it. It never sends the token in
//! clear text to another host unless told to, reads at most [`MAX_BODY_BYTES`] of any answer, and
//! hides credentials in every message it makes.

use std::fmt;
use std::time::Duration;

use customer_record::CustomerRecord;
pub use reqwest::Url;
use reqwest::{StatusCode, header};
use serde::Deserialize;
use sync_topology::redact;

/// The body a CRM write or lookup answers with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CrmCustomer {
    pub crm_id: String,
    pub customer: CustomerRecord,
}

/// What became of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrmReply {
    /// 2xx with the body we expect.
    Stored(CrmCustomer),
    /// `GET` answered 404: the CRM does not know the customer.
    NotFound,
    /// Worth retrying: timeouts, connection errors, 5xx, 408, 429, and 2xx bodies we cannot read.
    Transient(Transient),
    /// The CRM refused the request for good (4xx other than 401/403/408/429).
    Refused { status: u16, body: String },
    /// 401/403: the CRM refused our credentials. Not this record's fault, so never a dead letter.
    Unauthorized { status: u16, body: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transient {
    pub status: Option<u16>,
    /// The CRM's `Retry-After`, when it sent one.
    pub retry_after: Option<Duration>,
    /// The request may have been applied without us learning it (timeout, lost connection, 504).
    pub maybe_applied: bool,
    /// A sign the CRM is overloaded rather than randomly failing: 429, client-side timeouts.
    pub congestion: bool,
    /// No connection could be made: nothing was sent, and the CRM (not the record) is the problem.
    pub unreachable: bool,
    pub detail: String,
}

impl fmt::Display for Transient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(status) => write!(f, "HTTP {status}: {}", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

/// Which write a send is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Create,
    Update,
}

#[derive(Debug, thiserror::Error)]
pub enum CrmClientError {
    #[error("cannot build the HTTP client for the CRM: {0}")]
    Build(#[from] reqwest::Error),
    #[error("CRM URL {url} cannot take a path (is it http(s)://host:port?)")]
    BadBaseUrl { url: String },
    #[error("CRM token is not a valid HTTP header value")]
    BadToken,
    #[error(
        "refusing to send the CRM token in clear text to {url}: use an https:// CRM URL, or pass \
         --allow-insecure-crm (CRM_ALLOW_INSECURE=true) if the network to it is private"
    )]
    InsecureToken { url: String },
}

/// Longest body kept from a refusal, so a dead letter stays small.
const MAX_KEPT_BODY: usize = 4096;

/// Most bytes of one answer the client reads: a CRM (or whatever answers in its place) cannot make
/// a replica hold an unbounded body in memory. Far above any customer record.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Whether a URL's host is this machine, where clear text never crosses a network.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[derive(Clone)]
pub struct CrmClient {
    http: reqwest::Client,
    base: Url,
}

impl fmt::Debug for CrmClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrmClient")
            .field("base", &redact(self.base.as_str()))
            .finish_non_exhaustive()
    }
}

impl CrmClient {
    /// A client of the CRM at `base`. A token (or a password in the URL) goes over plain `http://`
    /// only to this machine, unless `allow_insecure`: anyone on the path could read it.
    pub fn new(
        base: Url,
        token: Option<&str>,
        request_timeout: Duration,
        max_connections: usize,
        allow_insecure: bool,
    ) -> Result<Self, CrmClientError> {
        if base.cannot_be_a_base() {
            return Err(CrmClientError::BadBaseUrl {
                url: redact(base.as_str()),
            });
        }
        let credentials = token.is_some() || base.password().is_some();
        if credentials && base.scheme() == "http" && !is_loopback(&base) && !allow_insecure {
            return Err(CrmClientError::InsecureToken {
                url: redact(base.as_str()),
            });
        }
        let mut headers = header::HeaderMap::new();
        if let Some(token) = token {
            let mut value = header::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| CrmClientError::BadToken)?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(max_connections)
            .tcp_nodelay(true)
            .build()?;
        Ok(CrmClient { http, base })
    }

    fn customer_url(&self, id: Option<&str>) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push("customers");
            if let Some(id) = id {
                segments.push(id);
            }
        }
        url
    }

    /// `POST /customers` or `PUT /customers/{id}` with the idempotency key, given up after
    /// `timeout` (at most the client's request timeout).
    pub async fn write(
        &self,
        write: Write,
        customer: &CustomerRecord,
        idempotency_key: &str,
        timeout: Duration,
    ) -> CrmReply {
        let request = match write {
            Write::Create => self.http.post(self.customer_url(None)),
            Write::Update => self.http.put(self.customer_url(Some(&customer.id))),
        };
        let sent = request
            .header("Idempotency-Key", idempotency_key)
            .timeout(timeout)
            .json(customer)
            .send()
            .await;
        classify(sent, true).await
    }

    /// `GET /customers/{id}`, given up after `timeout`.
    pub async fn look_up(&self, customer_id: &str, timeout: Duration) -> CrmReply {
        let sent = self
            .http
            .get(self.customer_url(Some(customer_id)))
            .timeout(timeout)
            .send()
            .await;
        classify(sent, false).await
    }
}

async fn classify(sent: Result<reqwest::Response, reqwest::Error>, is_write: bool) -> CrmReply {
    let response = match sent {
        Ok(response) => response,
        Err(err) => {
            // A connect error means nothing was sent; anything later may have been applied.
            let maybe_applied = is_write && !err.is_connect();
            return CrmReply::Transient(Transient {
                status: None,
                retry_after: None,
                maybe_applied,
                congestion: err.is_timeout(),
                unreachable: err.is_connect(),
                detail: describe_transport_error(&err),
            });
        }
    };
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let body = match read_capped(response, MAX_BODY_BYTES).await {
        Ok(Capped::Whole(body)) => body,
        Ok(Capped::Cut(body)) if status.is_success() => {
            // Not the small JSON we expect; it may still have applied the write.
            return CrmReply::Transient(Transient {
                status: Some(status.as_u16()),
                retry_after,
                maybe_applied: is_write,
                congestion: false,
                unreachable: false,
                detail: format!(
                    "answer body is over the {} KiB this client reads (read no further): {}",
                    MAX_BODY_BYTES / 1024,
                    kept_body(&body)
                ),
            });
        }
        // The status alone decides a refusal or a failure; its start is all a dead letter keeps.
        Ok(Capped::Cut(body)) => body,
        Err(err) => {
            return CrmReply::Transient(Transient {
                status: Some(status.as_u16()),
                retry_after,
                maybe_applied: is_write,
                congestion: err.is_timeout(),
                unreachable: false,
                detail: format!("answer body lost: {}", describe_transport_error(&err)),
            });
        }
    };
    classify_answer(status, retry_after, &body, is_write)
}

/// An answer's body, whole or cut at the limit.
enum Capped {
    Whole(Vec<u8>),
    Cut(Vec<u8>),
}

/// Reads at most `limit` bytes of the body, chunk by chunk, so a huge or endless answer costs
/// no more memory than that.
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Capped, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|length| length > limit as u64)
    {
        // Announced too large: nothing of it is worth reading.
        return Ok(Capped::Cut(Vec::new()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            body.extend_from_slice(&chunk[..limit - body.len()]);
            return Ok(Capped::Cut(body));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Capped::Whole(body))
}

fn describe_transport_error(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = format!("{kind}: {err}");
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    // reqwest names the URL, which may carry a password.
    redact(&text)
}

/// `Retry-After` in either of its forms (RFC 9110, section 10.2.3): a number of seconds, or an
/// HTTP-date, of which a past one means "now". Anything else is ignored and our own backoff applies.
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let text = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(text).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn kept_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.len() <= MAX_KEPT_BODY {
        return text.into_owned();
    }
    let mut end = MAX_KEPT_BODY;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The pure part of [`classify`], testable without a server.
pub fn classify_answer(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    is_write: bool,
) -> CrmReply {
    if status.is_success() {
        return match serde_json::from_slice::<CrmCustomer>(body) {
            Ok(stored) => CrmReply::Stored(stored),
            // The CRM said yes in a way we cannot read; it may have applied it, so resend only
            // after a lookup.
            Err(err) => CrmReply::Transient(Transient {
                status: Some(status.as_u16()),
                retry_after: None,
                maybe_applied: is_write,
                congestion: false,
                unreachable: false,
                detail: format!(
                    "2xx answer is not {{\"crm_id\",\"customer\"}} JSON ({err}): {}",
                    kept_body(body)
                ),
            }),
        };
    }
    if status == StatusCode::NOT_FOUND && !is_write {
        return CrmReply::NotFound;
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        // Our credentials, not this record: dead-lettering every record for a wrong token would
        // empty the stream into the DLQ. Held back (and feeding the breaker) until fixed.
        tracing::error!(
            status = status.as_u16(),
            "the CRM refused our credentials: check CRM_API_TOKEN / --crm-token"
        );
        return CrmReply::Unauthorized {
            status: status.as_u16(),
            body: kept_body(body),
        };
    }
    let transient = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS;
    if transient {
        return CrmReply::Transient(Transient {
            status: Some(status.as_u16()),
            retry_after,
            maybe_applied: is_write && status == StatusCode::GATEWAY_TIMEOUT,
            // 429 says "too much" outright; a 503 or 504 may be one broken backend among many, so
            // they feed the breaker but do not shrink the concurrency.
            congestion: status == StatusCode::TOO_MANY_REQUESTS,
            unreachable: false,
            detail: kept_body(body),
        });
    }
    CrmReply::Refused {
        status: status.as_u16(),
        body: kept_body(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_retry_after(value: &str) -> header::HeaderMap {
        let mut headers = header::HeaderMap::new();
        headers.insert(
            header::RETRY_AFTER,
            header::HeaderValue::from_str(value).expect("a valid header value"),
        );
        headers
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_as_an_http_date() {
        assert_eq!(
            retry_after(&with_retry_after(" 7 ")),
            Some(Duration::from_secs(7))
        );
        let in_a_minute = std::time::SystemTime::now() + Duration::from_secs(60);
        let wait = retry_after(&with_retry_after(&httpdate::fmt_http_date(in_a_minute)))
            .expect("an HTTP-date is understood");
        assert!(
            wait > Duration::from_secs(55) && wait <= Duration::from_secs(60),
            "{wait:?}"
        );
        assert_eq!(
            retry_after(&with_retry_after("Sun, 06 Nov 1994 08:49:37 GMT")),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
        assert_eq!(retry_after(&with_retry_after("soon")), None);
    }

    #[test]
    fn refused_credentials_are_their_own_answer_not_a_refusal_of_the_record() {
        for status in [StatusCode::UNAUTHORIZED, StatusCode::FORBIDDEN] {
            match classify_answer(status, None, b"{\"error\":\"no\"}", true) {
                CrmReply::Unauthorized { status: s, body } => {
                    assert_eq!(s, status.as_u16());
                    assert!(body.contains("no"), "{body}");
                }
                other => panic!("{status}: expected Unauthorized, got {other:?}"),
            }
        }
    }

    const STORED: &[u8] =
        br#"{"crm_id":"crm-7","customer":{"id":"1","first_name":"A","last_name":"B","email":"a@b.io"}}"#;

    #[test]
    fn a_readable_2xx_is_stored() {
        match classify_answer(StatusCode::CREATED, None, STORED, true) {
            CrmReply::Stored(stored) => {
                assert_eq!(stored.crm_id, "crm-7");
                assert_eq!(stored.customer.id, "1");
            }
            other => panic!("expected Stored, got {other:?}"),
        }
    }

    #[test]
    fn a_2xx_with_an_unexpected_body_is_a_failure_that_may_have_applied() {
        match classify_answer(StatusCode::OK, None, b"<html>ok</html>", true) {
            CrmReply::Transient(t) => {
                assert!(t.maybe_applied);
                assert!(t.detail.contains("<html>"), "{}", t.detail);
            }
            other => panic!("expected Transient, got {other:?}"),
        }
    }

    #[test]
    fn rate_limits_and_server_errors_are_retried() {
        let limited = classify_answer(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(2)),
            b"{}",
            true,
        );
        assert!(matches!(
            limited,
            CrmReply::Transient(Transient { retry_after: Some(d), congestion: true, maybe_applied: false, .. })
                if d == Duration::from_secs(2)
        ));
        for status in [500u16, 502, 503, 408] {
            let status = StatusCode::from_u16(status).expect("valid status");
            assert!(matches!(
                classify_answer(status, None, b"", true),
                CrmReply::Transient(Transient {
                    maybe_applied: false,
                    ..
                })
            ));
        }
        assert!(matches!(
            classify_answer(StatusCode::GATEWAY_TIMEOUT, None, b"", true),
            CrmReply::Transient(Transient {
                maybe_applied: true,
                ..
            })
        ));
    }

    #[test]
    fn other_client_errors_are_refused_with_their_body() {
        let refused = classify_answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
            br#"{"error":"bad email"}"#,
            true,
        );
        assert_eq!(
            refused,
            CrmReply::Refused {
                status: 422,
                body: r#"{"error":"bad email"}"#.into()
            }
        );
        assert!(matches!(
            classify_answer(StatusCode::NOT_FOUND, None, b"", false),
            CrmReply::NotFound
        ));
        assert!(matches!(
            classify_answer(StatusCode::NOT_FOUND, None, b"", true),
            CrmReply::Refused { status: 404, .. }
        ));
    }

    #[test]
    fn customer_urls_escape_the_id() {
        let client = CrmClient::new(
            Url::parse("http://127.0.0.1:8080").expect("url"),
            None,
            Duration::from_secs(1),
            8,
            false,
        )
        .expect("client");
        assert_eq!(
            client.customer_url(None).as_str(),
            "http://127.0.0.1:8080/customers"
        );
        assert_eq!(
            client.customer_url(Some("a/b c")).as_str(),
            "http://127.0.0.1:8080/customers/a%2Fb%20c"
        );
    }

    #[test]
    fn a_token_goes_in_clear_text_only_to_this_machine_unless_allowed() {
        let client = |url: &str, token: Option<&str>, allow: bool| {
            CrmClient::new(
                Url::parse(url).expect("url"),
                token,
                Duration::from_secs(1),
                1,
                allow,
            )
        };
        for url in [
            "http://crm.example:8080",
            "http://10.1.2.3",
            "http://u:pw@crm.example",
        ] {
            let token = (!url.contains('@')).then_some("t0k");
            let refused = client(url, token, false).expect_err(url).to_string();
            assert!(refused.contains("--allow-insecure-crm"), "{refused}");
            assert!(!refused.contains("pw@"), "{refused}");
            assert!(client(url, token, true).is_ok(), "{url} allowed");
        }
        for url in [
            "https://crm.example",
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://[::1]:8080",
        ] {
            assert!(client(url, Some("t0k"), false).is_ok(), "{url}");
        }
        assert!(client("http://crm.example", None, false).is_ok());
    }

    /// A one-shot HTTP server answering every connection with `head` and then `body_len` bytes of
    /// `x`, chunk after chunk: a CRM gone mad, not a mock of one.
    async fn answering(head: &'static str, body_len: usize) -> Url {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = socket.read(&mut request).await;
                    let _ = socket.write_all(head.as_bytes()).await;
                    let chunk = vec![b'x'; 64 * 1024];
                    let mut sent = 0;
                    while sent < body_len {
                        let n = chunk.len().min(body_len - sent);
                        if socket.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        sent += n;
                    }
                });
            }
        });
        Url::parse(&format!("http://{addr}")).expect("url")
    }

    #[tokio::test]
    async fn answers_are_read_up_to_a_mebibyte() {
        let record = CustomerRecord::normalised("1", "A", "B", "a@b.io", None, Default::default());
        // No length announced: the body is read up to the cap, then given up.
        let endless = answering("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", 64 << 20).await;
        let client =
            CrmClient::new(endless, None, Duration::from_secs(10), 1, false).expect("client");
        match client
            .write(Write::Create, &record, "k", Duration::from_secs(10))
            .await
        {
            CrmReply::Transient(t) => {
                assert!(t.maybe_applied, "{t:?}");
                assert!(t.detail.contains("over the 1024 KiB"), "{}", t.detail);
                assert!(t.detail.len() < 2 * MAX_KEPT_BODY, "{}", t.detail.len());
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        // Announced too long: refused without reading it; the status still decides.
        let announced = answering(
            "HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 5000000\r\n\r\n",
            5_000_000,
        )
        .await;
        let client =
            CrmClient::new(announced, None, Duration::from_secs(10), 1, false).expect("client");
        assert!(matches!(
            client
                .write(Write::Create, &record, "k", Duration::from_secs(10))
                .await,
            CrmReply::Refused { status: 422, .. }
        ));
    }

    #[test]
    fn long_bodies_are_cut() {
        let long = "é".repeat(5000);
        let kept = kept_body(long.as_bytes());
        assert!(kept.len() <= MAX_KEPT_BODY + 4);
    }
}
