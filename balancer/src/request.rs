//! Reading a query request: the JSON body, validated, with errors that name the problem.

use serde_json::Value;

/// Longest accepted query, in characters.
pub const MAX_QUERY_CHARS: usize = 1000;
/// Largest accepted request body, in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Results per query at most.
pub const MAX_K: usize = 50;
/// Results per query when the request gives no `k`.
pub const DEFAULT_K: usize = 5;

/// A valid query request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryRequest {
    /// The query as sent (trimmed).
    pub query: String,
    pub k: usize,
    /// The client's own deadline (`X-Request-Timeout`), when shorter than the balancer's.
    pub timeout: Option<std::time::Duration>,
}

impl QueryRequest {
    /// The cache key part: case-folded, whitespace collapsed. Every query computes it
    /// (cache hits and refusals included), so it is built in one pass with one allocation;
    /// an ASCII word folds byte by byte, any other as `str::to_lowercase` would.
    pub fn normalized(&self) -> String {
        let mut out = String::with_capacity(self.query.len());
        for word in self.query.split_whitespace() {
            if !out.is_empty() {
                out.push(' ');
            }
            if word.is_ascii() {
                out.extend(word.bytes().map(|b| char::from(b.to_ascii_lowercase())));
            } else {
                out.push_str(&word.to_lowercase());
            }
        }
        out
    }
}

/// Every kind of error the API answers, with its HTTP status and its name in the JSON
/// body (`{"error": {"kind": ..., "message": ...}}`): one place for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApiErrorKind {
    // 400: the request is wrong; the message names the field or the limit.
    BadBody,
    InvalidJson,
    InvalidBody,
    MissingField,
    UnknownField,
    WrongType,
    EmptyQuery,
    QueryTooLong,
    KOutOfRange,
    InvalidTimeout,
    BadUserId,
    // Keys and limits (auth.rs).
    MissingApiKey,
    InvalidApiKey,
    Forbidden,
    RateLimited,
    // Routes.
    NotFound,
    MethodNotAllowed,
    BodyTooLarge,
    // 503: simq cannot answer now (`Retry-After` where a retry may help).
    NoActiveDg,
    Overloaded,
    NoEmbedder,
    EmbedderFailed,
    NoShard,
    ShardsFailed,
    LexicalFailed,
}

impl ApiErrorKind {
    /// The HTTP status answered for this kind.
    pub fn status(self) -> u16 {
        use ApiErrorKind::*;
        match self {
            BadBody | InvalidJson | InvalidBody | MissingField | UnknownField | WrongType
            | EmptyQuery | QueryTooLong | KOutOfRange | InvalidTimeout | BadUserId => 400,
            MissingApiKey | InvalidApiKey => 401,
            Forbidden => 403,
            NotFound => 404,
            MethodNotAllowed => 405,
            BodyTooLarge => 413,
            RateLimited => 429,
            NoActiveDg | Overloaded | NoEmbedder | EmbedderFailed | NoShard | ShardsFailed
            | LexicalFailed => 503,
        }
    }

    /// The machine-readable name clients see, e.g. "invalid_json"; also a metric label.
    pub fn as_str(self) -> &'static str {
        use ApiErrorKind::*;
        match self {
            BadBody => "bad_body",
            InvalidJson => "invalid_json",
            InvalidBody => "invalid_body",
            MissingField => "missing_field",
            UnknownField => "unknown_field",
            WrongType => "wrong_type",
            EmptyQuery => "empty_query",
            QueryTooLong => "query_too_long",
            KOutOfRange => "k_out_of_range",
            InvalidTimeout => "invalid_timeout",
            BadUserId => "bad_user_id",
            MissingApiKey => "missing_api_key",
            InvalidApiKey => "invalid_api_key",
            Forbidden => "forbidden",
            RateLimited => "rate_limited",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            BodyTooLarge => "body_too_large",
            NoActiveDg => "no_active_dg",
            Overloaded => "overloaded",
            NoEmbedder => "no_embedder",
            EmbedderFailed => "embedder_failed",
            NoShard => "no_shard",
            ShardsFailed => "shards_failed",
            LexicalFailed => "lexical_failed",
        }
    }
}

impl std::fmt::Display for ApiErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answered to the client: HTTP status and a message naming the problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ApiErrorKind,
    pub message: String,
    /// Seconds a client should wait before trying again (`Retry-After`), for refusals.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(kind: ApiErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The HTTP status answered: the kind's.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    pub fn with_retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    pub fn body(&self) -> Value {
        serde_json::json!({"error": {"kind": self.kind.as_str(), "message": self.message}})
    }
}

/// Parse and validate a request body.
pub fn parse(body: &[u8]) -> Result<QueryRequest, ApiError> {
    let bad = |kind, msg: String| Err(ApiError::new(kind, msg));
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::new(
            ApiErrorKind::BodyTooLarge,
            format!(
                "request body has {} bytes, the limit is {MAX_BODY_BYTES}",
                body.len()
            ),
        ));
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return bad(
                ApiErrorKind::InvalidJson,
                format!("body is not valid JSON: {e}"),
            )
        }
    };
    let Value::Object(obj) = value else {
        return bad(
            ApiErrorKind::InvalidBody,
            "body must be a JSON object like {\"query\": \"...\"}".into(),
        );
    };
    let unknown: Vec<String> = obj
        .keys()
        .filter(|k| !FIELDS.contains(&k.as_str()))
        .map(|k| format!("{:?}", k.chars().take(40).collect::<String>()))
        .collect();
    if !unknown.is_empty() && obj.contains_key("query") {
        return bad(
            ApiErrorKind::UnknownField,
            format!(
                "unknown field{} {}; a query body has only \"query\" and \"k\"",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.join(", ")
            ),
        );
    }
    let query = match obj.get("query") {
        None => {
            let mut msg = "field \"query\" is missing".to_string();
            if !unknown.is_empty() {
                msg += &format!(
                    " (the body has {}; a query body has only \"query\" and \"k\")",
                    unknown.join(", ")
                );
            }
            return bad(ApiErrorKind::MissingField, msg);
        }
        Some(Value::String(s)) => s.trim().to_string(),
        Some(other) => {
            return bad(
                ApiErrorKind::WrongType,
                format!("field \"query\" must be a string, got {}", type_name(other)),
            )
        }
    };
    if query.chars().all(invisible) {
        return bad(
            ApiErrorKind::EmptyQuery,
            "field \"query\" is empty (or only spaces, control or zero-width characters)".into(),
        );
    }
    let chars = query.chars().count();
    if chars > MAX_QUERY_CHARS {
        return bad(
            ApiErrorKind::QueryTooLong,
            format!("field \"query\" has {chars} characters, the limit is {MAX_QUERY_CHARS}"),
        );
    }
    let k = match obj.get("k") {
        None | Some(Value::Null) => DEFAULT_K,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(k) if (1..=MAX_K as u64).contains(&k) => k as usize,
            _ => {
                return bad(
                    ApiErrorKind::KOutOfRange,
                    format!("field \"k\" is {n}, must be an integer in 1..={MAX_K}"),
                )
            }
        },
        Some(other) => {
            return bad(
                ApiErrorKind::WrongType,
                format!("field \"k\" must be an integer, got {}", type_name(other)),
            )
        }
    };
    Ok(QueryRequest {
        query,
        k,
        timeout: None,
    })
}

/// The header in which a client gives its own deadline, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout";
/// Shortest deadline a client may ask for.
pub const MIN_TIMEOUT_MS: u64 = 10;

/// The client's deadline from the `X-Request-Timeout` header (milliseconds, an integer of
/// at least [`MIN_TIMEOUT_MS`]); None without the header.
pub fn request_timeout(header: Option<&[u8]>) -> Result<Option<std::time::Duration>, ApiError> {
    let Some(raw) = header else { return Ok(None) };
    match std::str::from_utf8(raw).ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(ms) if ms >= MIN_TIMEOUT_MS => Ok(Some(std::time::Duration::from_millis(ms))),
        _ => Err(ApiError::new(
            ApiErrorKind::InvalidTimeout,
            format!(
                "header X-Request-Timeout is {:?}; it must be a whole number of milliseconds, at least {MIN_TIMEOUT_MS}",
                String::from_utf8_lossy(raw).chars().take(40).collect::<String>()
            ),
        )),
    }
}

/// The fields of a query body.
const FIELDS: [&str; 2] = ["query", "k"];

/// Characters that show nothing: whitespace, control characters and the zero-width and
/// direction marks (a query of only these is empty).
fn invisible(c: char) -> bool {
    c.is_whitespace()
        || c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
            | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
            | '\u{FFA0}' | '\u{E0000}'..='\u{E007F}')
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> ApiError {
        parse(body.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_client_deadline_is_whole_milliseconds_of_at_least_the_minimum() {
        use std::time::Duration;
        assert_eq!(request_timeout(None).unwrap(), None);
        assert_eq!(
            request_timeout(Some(b" 250 ")).unwrap(),
            Some(Duration::from_millis(250))
        );
        for bad in [&b"0"[..], b"9", b"1.5", b"-3", b"soon", b"\xff"] {
            let e = request_timeout(Some(bad)).unwrap_err();
            assert_eq!(
                (e.status(), e.kind),
                (400, ApiErrorKind::InvalidTimeout),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn plain_and_full_bodies_parse() {
        assert_eq!(
            parse(br#"{"query": "  How do I sort?  "}"#).unwrap(),
            QueryRequest {
                query: "How do I sort?".into(),
                k: 5,
                timeout: None,
            }
        );
        assert_eq!(parse(br#"{"query": "x", "k": 12}"#).unwrap().k, 12);
    }

    #[test]
    fn each_bad_input_names_its_problem() {
        assert_eq!(err("not json").kind, ApiErrorKind::InvalidJson);
        assert_eq!(err("[1]").kind, ApiErrorKind::InvalidBody);
        assert_eq!(err("{}").message, "field \"query\" is missing");
        assert_eq!(
            err(r#"{"query": 5}"#).message,
            "field \"query\" must be a string, got a number"
        );
        assert_eq!(
            err(r#"{"query": "   "}"#).message,
            "field \"query\" is empty (or only spaces, control or zero-width characters)"
        );
        for invisible in [
            "\u{200b}\u{200d}",
            "\u{0007}\t",
            "\u{feff} \u{2060}",
            "\u{3000}\u{00ad}",
        ] {
            let body = serde_json::json!({ "query": invisible }).to_string();
            assert_eq!(err(&body).kind, ApiErrorKind::EmptyQuery, "{invisible:?}");
        }
        assert_eq!(
            err(r#"{"query": "x", "top_k": 3}"#).message,
            "unknown field \"top_k\"; a query body has only \"query\" and \"k\""
        );
        assert_eq!(
            err(r#"{"text": "x"}"#).message,
            "field \"query\" is missing (the body has \"text\"; a query body has only \"query\" and \"k\")"
        );
        assert_eq!(
            err(r#"{"query": "x", "a": 1, "b": 2}"#).message,
            "unknown fields \"a\", \"b\"; a query body has only \"query\" and \"k\""
        );
        let long = format!(r#"{{"query": "{}"}}"#, "a".repeat(1001));
        assert_eq!(
            err(&long).message,
            "field \"query\" has 1001 characters, the limit is 1000"
        );
        assert_eq!(
            err(r#"{"query": "x", "k": 0}"#).kind,
            ApiErrorKind::KOutOfRange
        );
        assert_eq!(
            err(r#"{"query": "x", "k": 51}"#).message,
            "field \"k\" is 51, must be an integer in 1..=50"
        );
        assert_eq!(
            err(r#"{"query": "x", "k": 2.5}"#).kind,
            ApiErrorKind::KOutOfRange
        );
        assert_eq!(
            err(r#"{"query": "x", "k": "3"}"#).message,
            "field \"k\" must be an integer, got a string"
        );
        let huge = vec![b' '; MAX_BODY_BYTES + 1];
        let e = parse(&huge).unwrap_err();
        assert_eq!((e.status(), e.kind), (413, ApiErrorKind::BodyTooLarge));
        assert!(err("{}").status() == 400);
    }

    #[test]
    fn normalized_folds_case_and_space() {
        let q = parse(br#"{"query": "How  DO i\tSort?"}"#).unwrap();
        assert_eq!(q.normalized(), "how do i sort?");
    }
}

/// Hostile input: whatever the body, `parse` answers a request or a 4xx, never a panic.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn normalized_is_the_lowercase_of_the_words_joined_by_one_space(
            query in "([ \t\n\x0b\x0c\r\u{85}\u{a0}\u{3000}]|[a-zA-Z?]|\\PC){0,40}",
        ) {
            let q = QueryRequest { query: query.clone(), k: DEFAULT_K, timeout: None };
            let reference = query.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
            prop_assert_eq!(q.normalized(), reference);
        }

        #[test]
        fn any_bytes_give_a_request_or_a_4xx(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Err(e) = parse(&body) {
                prop_assert!((400..500).contains(&e.status()), "{e:?}");
            }
        }

        #[test]
        fn any_object_gives_a_valid_request_or_a_4xx(
            query in proptest::option::of(any::<String>()),
            k in proptest::option::of(any::<i64>()),
            extra in proptest::option::of("[a-z_]{1,8}"),
        ) {
            let mut obj = serde_json::Map::new();
            if let Some(q) = &query { obj.insert("query".into(), q.clone().into()); }
            if let Some(k) = k { obj.insert("k".into(), k.into()); }
            if let Some(f) = &extra { obj.insert(f.clone(), 1.into()); }
            match parse(serde_json::to_string(&obj).unwrap().as_bytes()) {
                Ok(r) => {
                    prop_assert!((1..=MAX_K).contains(&r.k));
                    prop_assert!(!r.query.chars().all(invisible));
                    prop_assert!(r.query.chars().count() <= MAX_QUERY_CHARS);
                }
                Err(e) => prop_assert!((400..500).contains(&e.status()), "{e:?}"),
            }
        }
    }
}
