//! The one place where errors become responses: JSON for HTTP clients, gRPC status for gRPC.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::proxy::authorize::AuthError;
use crate::proxy::policy::PolicyError;
use crate::proxy::upstream::ForwardError;
use crate::wire::path::PathError;

/// Everything the request path can answer instead of forwarding.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Malformed request.
    #[error("{0}")]
    BadRequest(&'static str),
    /// The key was offered ambiguously (two `Authorization` headers).
    #[error(transparent)]
    Credential(#[from] crate::proxy::credential::CredentialError),
    /// Unsafe or malformed path.
    #[error("{0}")]
    Path(#[from] PathError),
    /// No route matches host, method and path.
    #[error("no route matches this request")]
    NoRoute,
    /// Key problems.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A valid key refused by its networks, rate limits or quota.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Upstream problems.
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// The request head is larger than `limits.max_header_bytes`.
    #[error("the request headers are too large")]
    HeadersTooLarge,
}

/// gRPC status codes used here.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum GrpcStatus {
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl GatewayError {
    /// Status, machine-readable code and gRPC status, in one exhaustive match.
    fn classify(&self) -> (StatusCode, &'static str, GrpcStatus) {
        match self {
            GatewayError::BadRequest(_) | GatewayError::Path(_) | GatewayError::Credential(_) => (
                StatusCode::BAD_REQUEST,
                "bad_request",
                GrpcStatus::InvalidArgument,
            ),
            GatewayError::NoRoute => (StatusCode::NOT_FOUND, "no_route", GrpcStatus::Unimplemented),
            GatewayError::Auth(a) => match a {
                AuthError::Missing(_) => (
                    StatusCode::UNAUTHORIZED,
                    "missing_api_key",
                    GrpcStatus::Unauthenticated,
                ),
                AuthError::Invalid => (
                    StatusCode::UNAUTHORIZED,
                    "invalid_api_key",
                    GrpcStatus::Unauthenticated,
                ),
                AuthError::Expired => (
                    StatusCode::UNAUTHORIZED,
                    "expired_api_key",
                    GrpcStatus::Unauthenticated,
                ),
                AuthError::Revoked => (
                    StatusCode::UNAUTHORIZED,
                    "revoked_api_key",
                    GrpcStatus::Unauthenticated,
                ),
                AuthError::InsufficientScope(_) => (
                    StatusCode::FORBIDDEN,
                    "insufficient_scope",
                    GrpcStatus::PermissionDenied,
                ),
            },
            GatewayError::Policy(p) => match p {
                PolicyError::ClientNotAllowed => (
                    StatusCode::FORBIDDEN,
                    "client_not_allowed",
                    GrpcStatus::PermissionDenied,
                ),
                PolicyError::RateLimited { .. } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    GrpcStatus::ResourceExhausted,
                ),
                PolicyError::QuotaExceeded { .. } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    "quota_exceeded",
                    GrpcStatus::ResourceExhausted,
                ),
            },
            GatewayError::Forward(f) => match f {
                ForwardError::Unavailable(_) => (
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    GrpcStatus::Unavailable,
                ),
                ForwardError::Timeout => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    GrpcStatus::DeadlineExceeded,
                ),
                ForwardError::BadBody => (
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    GrpcStatus::InvalidArgument,
                ),
                ForwardError::BodyTooLarge => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    GrpcStatus::ResourceExhausted,
                ),
            },
            GatewayError::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                GrpcStatus::ResourceExhausted,
            ),
        }
    }

    /// The gRPC status a gRPC client is answered with.
    pub fn grpc_code(&self) -> u8 {
        self.classify().2 as u8
    }

    /// The machine-readable code of the JSON body, also the access log's `error`.
    pub fn code(&self) -> &'static str {
        self.classify().1
    }
}

/// `Retry-After` and the IETF draft's `RateLimit-Policy` and `RateLimit` on a 429.
fn retry_headers(err: &GatewayError, h: &mut http::HeaderMap) {
    let GatewayError::Policy(p) = err else { return };
    let (name, quota, window, wait) = match p {
        PolicyError::RateLimited { rate, of, wait } => {
            (of.name(), rate.count, rate.window_secs(), wait)
        }
        PolicyError::QuotaExceeded { quota, wait } => {
            let (start, end) = quota.period(crate::proxy::authorize::now_secs());
            (
                "quota",
                quota.count,
                u64::try_from(end - start).unwrap_or(0),
                wait,
            )
        }
        PolicyError::ClientNotAllowed => return,
    };
    let secs = wait.retry_after;
    h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    let policy = format!("\"{name}\";q={quota};w={window}");
    let state = format!("\"{name}\";r=0;t={secs}");
    for (header, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(header, v);
        }
    }
}

#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

/// Builds the response for an error; `www_authenticate` goes on every 401.
pub fn response(
    err: &GatewayError,
    www_authenticate: &HeaderValue,
    grpc: bool,
) -> Response<Full<Bytes>> {
    let (status, code, grpc_status) = err.classify();
    let message = err.to_string();
    if grpc {
        let mut resp = grpc_response(grpc_status, &message);
        retry_headers(err, resp.headers_mut());
        return resp;
    }
    let body = serde_json::to_vec(&ErrorBody {
        error: code,
        message: &message,
    })
    .unwrap_or_else(|_| br#"{"error":"internal","message":"error"}"#.to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(WWW_AUTHENTICATE, www_authenticate.clone());
    }
    retry_headers(err, resp.headers_mut());
    resp
}

/// A trailers-only gRPC answer: HTTP 200 with `grpc-status` and `grpc-message`.
fn grpc_response(status: GrpcStatus, message: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from(status as u16));
    if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(message)) {
        h.insert("grpc-message", v);
    }
    resp
}

/// gRPC's percent-encoding of `grpc-message` (space and visible ASCII except `%` stay).
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// True for requests from gRPC clients, which get gRPC-native errors.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
