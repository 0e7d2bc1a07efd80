//! The CRM's HTTP API as this product sees it: create, update and look up a customer, and the
//! classification of every answer into success, "try again", "refused for good" and "refused our
//! credentials". The integrator sends through it; `syncctl verify --crm` reads through it; the
//! benchmark's reference driver sends the same requests through it.

use std::fmt;
use std::time::Duration;

use customer_record::CustomerRecord;
pub use reqwest::Url;
use reqwest::{StatusCode, header};
use serde::Deserialize;

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
}

/// Longest body kept from a refusal, so a dead letter stays small.
const MAX_KEPT_BODY: usize = 4096;

#[derive(Clone)]
pub struct CrmClient {
    http: reqwest::Client,
    base: Url,
}

impl fmt::Debug for CrmClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CrmClient")
            .field("base", &self.base.as_str())
            .finish_non_exhaustive()
    }
}

impl CrmClient {
    pub fn new(
        base: Url,
        token: Option<&str>,
        request_timeout: Duration,
        max_connections: usize,
    ) -> Result<Self, CrmClientError> {
        if base.cannot_be_a_base() {
            return Err(CrmClientError::BadBaseUrl {
                url: base.to_string(),
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
    let body = match response.bytes().await {
        Ok(body) => body,
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
    text
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
    fn long_bodies_are_cut() {
        let long = "é".repeat(5000);
        let kept = kept_body(long.as_bytes());
        assert!(kept.len() <= MAX_KEPT_BODY + 4);
    }
}
