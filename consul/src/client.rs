//! Async Consul HTTP client: KV with check-and-set, blocking queries and service health.

use std::time::Duration;

use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use crate::error::{Error, Result};
use simq_runtime::redact::redact;

/// Timeout of a request that is not a blocking query.
const PLAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A blocking query: answer only once the index moves past `index`, or after `wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockingQuery {
    /// The `X-Consul-Index` of the previous answer; 0 answers at once.
    pub index: u64,
    /// How long Consul may hold the request (it adds up to wait/16 of jitter).
    pub wait: Duration,
}

impl BlockingQuery {
    /// The index to send next, given the previous query's index and the new answer's.
    ///
    /// Consul's rules for followers of blocking queries: an index that went backwards
    /// (a snapshot restore, a new dev agent) restarts from 0, and an index of 0 is never
    /// sent back, since that would not block.
    pub fn next_index(previous: u64, answered: u64) -> u64 {
        if answered < previous {
            0
        } else {
            answered.max(1)
        }
    }
}

/// A value together with the Consul index it was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Indexed<T> {
    /// `X-Consul-Index` of the answer: feed it to the next [`BlockingQuery`].
    pub index: u64,
    pub value: T,
}

/// One KV entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPair {
    pub key: String,
    pub value: Vec<u8>,
    /// The index of the last write to this key: the `cas` to send to replace it.
    pub modify_index: u64,
    /// The session holding the key as a lock, if one does.
    pub session: Option<String>,
}

/// One instance of a service from `/v1/health/service/<name>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    pub id: String,
    pub name: String,
    /// The Consul node (agent) it is registered on, e.g. `n2`.
    pub node: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: std::collections::BTreeMap<String, String>,
    /// `passing` when every check passes, else the worst status (`warning`, `critical`).
    pub status: String,
}

/// A Consul agent's HTTP API.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl ConsulClient {
    /// A client for the agent at `addr` (`http://127.0.0.1:8500` or `127.0.0.1:8500`).
    pub fn new(addr: &str) -> Result<Self> {
        let base = if addr.contains("://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", addr.trim_end_matches('/'))
        };
        let url = reqwest::Url::parse(&base).map_err(|e| Error::InvalidAddress {
            addr: redact(addr),
            reason: e.to_string(),
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(Error::InvalidAddress {
                addr: redact(addr),
                reason: "not an http(s) URL with a host".into(),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| Error::InvalidAddress {
                addr: redact(addr),
                reason: e.to_string(),
            })?;
        Ok(Self {
            http,
            base,
            token: None,
        })
    }

    /// A client configured the way the `consul` CLI is: `CONSUL_HTTP_ADDR` (default
    /// `http://127.0.0.1:8500`) and `CONSUL_HTTP_TOKEN`.
    pub fn from_env() -> Result<Self> {
        let addr =
            std::env::var("CONSUL_HTTP_ADDR").unwrap_or_else(|_| "http://127.0.0.1:8500".into());
        let mut client = Self::new(&addr)?;
        client.token = std::env::var("CONSUL_HTTP_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        Ok(client)
    }

    /// Take the ACL token the way the `consul` CLI does: `CONSUL_HTTP_TOKEN`, else the
    /// file named by `CONSUL_HTTP_TOKEN_FILE`; no token when neither is set. The token is
    /// sent, never printed.
    pub fn with_env_token(self) -> std::result::Result<Self, TokenError> {
        match token_from_env("CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE")? {
            Some(t) => Ok(self.with_token(t)),
            None => Ok(self),
        }
    }

    /// Use an ACL token for every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The agent's base URL, without any user:password (fit to print).
    pub fn addr(&self) -> String {
        redact(&self.base)
    }

    /// The address of the Raft leader, empty while there is none.
    pub async fn leader(&self) -> Result<String> {
        let (_, body) = self
            .call(Method::GET, "/v1/status/leader", &[], None, None)
            .await?;
        decode::<String>("/v1/status/leader", &body.unwrap_or_default())
    }

    /// Read one key; `None` when it does not exist.
    pub async fn kv_get(
        &self,
        key: &str,
        block: Option<BlockingQuery>,
    ) -> Result<Indexed<Option<KvPair>>> {
        let path = format!("/v1/kv/{key}");
        let (index, body) = self.call(Method::GET, &path, &[], None, block).await?;
        let Some(body) = body else {
            return Ok(Indexed { index, value: None });
        };
        let raw: Vec<RawKv> = decode(&path, &body)?;
        let pair = raw
            .into_iter()
            .next()
            .map(|kv| kv.into_pair(&path))
            .transpose()?;
        Ok(Indexed { index, value: pair })
    }

    /// Read every key under `prefix` (recursive), in key order; empty when there is none.
    pub async fn kv_list(
        &self,
        prefix: &str,
        block: Option<BlockingQuery>,
    ) -> Result<Indexed<Vec<KvPair>>> {
        let path = format!("/v1/kv/{prefix}");
        let (index, body) = self
            .call(Method::GET, &path, &[("recurse", "true")], None, block)
            .await?;
        let Some(body) = body else {
            return Ok(Indexed {
                index,
                value: Vec::new(),
            });
        };
        let raw: Vec<RawKv> = decode(&path, &body)?;
        let pairs = raw
            .into_iter()
            .map(|kv| kv.into_pair(&path))
            .collect::<Result<Vec<_>>>()?;
        Ok(Indexed {
            index,
            value: pairs,
        })
    }

    /// Write one key unconditionally.
    pub async fn kv_put(&self, key: &str, value: &[u8]) -> Result<()> {
        let path = format!("/v1/kv/{key}");
        let (_, body) = self
            .call(Method::PUT, &path, &[], Some(value.to_vec()), None)
            .await?;
        let ok: bool = decode(&path, &body.unwrap_or_default())?;
        if !ok {
            return Err(Error::Decode {
                path,
                reason: "Consul refused an unconditional write".into(),
            });
        }
        Ok(())
    }

    /// Check-and-set: write only if the key's modify index is still `modify_index`
    /// (0: only if the key does not exist). `Ok(false)` when another writer got there first.
    pub async fn kv_cas(&self, key: &str, value: &[u8], modify_index: u64) -> Result<bool> {
        let path = format!("/v1/kv/{key}");
        let cas = modify_index.to_string();
        let (_, body) = self
            .call(
                Method::PUT,
                &path,
                &[("cas", cas.as_str())],
                Some(value.to_vec()),
                None,
            )
            .await?;
        decode(&path, &body.unwrap_or_default())
    }

    /// Delete one key (no error when it does not exist).
    pub async fn kv_delete(&self, key: &str) -> Result<()> {
        let path = format!("/v1/kv/{key}");
        self.call(Method::DELETE, &path, &[], None, None).await?;
        Ok(())
    }

    /// Check-and-set delete: only if the key's modify index is still `modify_index`.
    /// `Ok(false)` when another writer changed it first.
    pub async fn kv_delete_cas(&self, key: &str, modify_index: u64) -> Result<bool> {
        let path = format!("/v1/kv/{key}");
        let cas = modify_index.to_string();
        let (_, body) = self
            .call(Method::DELETE, &path, &[("cas", cas.as_str())], None, None)
            .await?;
        decode(&path, &body.unwrap_or_default())
    }

    /// Create a session that Consul deletes `ttl` after its last renewal (10 s to 24 h),
    /// deleting the keys it holds (behavior "delete"); returns its id.
    pub async fn session_create(&self, name: &str, ttl: Duration) -> Result<String> {
        let path = "/v1/session/create";
        let body = serde_json::json!({
            "Name": name,
            "TTL": format!("{}s", ttl.as_secs().max(10)),
            "Behavior": "delete",
            "LockDelay": "0s",
        });
        let (_, answer) = self
            .call(
                Method::PUT,
                path,
                &[],
                Some(body.to_string().into_bytes()),
                None,
            )
            .await?;
        #[derive(serde::Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        Ok(decode::<Created>(path, &answer.unwrap_or_default())?.id)
    }

    /// Renew a session's TTL; `Ok(false)` when the session no longer exists.
    pub async fn session_renew(&self, id: &str) -> Result<bool> {
        let path = format!("/v1/session/renew/{id}");
        match self.call(Method::PUT, &path, &[], None, None).await {
            Ok(_) => Ok(true),
            Err(Error::Status { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// End a session (its keys are deleted, releasing what it held).
    pub async fn session_destroy(&self, id: &str) -> Result<()> {
        let path = format!("/v1/session/destroy/{id}");
        self.call(Method::PUT, &path, &[], None, None).await?;
        Ok(())
    }

    /// Take the lock `key` for `session`, writing `value`; `Ok(false)` when another
    /// session holds it.
    pub async fn kv_acquire(&self, key: &str, value: &[u8], session: &str) -> Result<bool> {
        let path = format!("/v1/kv/{key}");
        let (_, body) = self
            .call(
                Method::PUT,
                &path,
                &[("acquire", session)],
                Some(value.to_vec()),
                None,
            )
            .await?;
        decode(&path, &body.unwrap_or_default())
    }

    /// Instances of a service with their aggregated check status; `passing_only` asks
    /// Consul to drop every instance with a non-passing check.
    pub async fn health_service(
        &self,
        service: &str,
        passing_only: bool,
        block: Option<BlockingQuery>,
    ) -> Result<Indexed<Vec<ServiceEntry>>> {
        let path = format!("/v1/health/service/{service}");
        let query: &[(&str, &str)] = if passing_only {
            &[("passing", "true")]
        } else {
            &[]
        };
        let (index, body) = self.call(Method::GET, &path, query, None, block).await?;
        let raw: Vec<RawHealth> = decode(&path, &body.unwrap_or_default())?;
        let value = raw.into_iter().map(RawHealth::into_entry).collect();
        Ok(Indexed { index, value })
    }

    /// One HTTP call. Returns the `X-Consul-Index` (0 when absent) and the body, `None` on 404.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
        block: Option<BlockingQuery>,
    ) -> Result<(u64, Option<Vec<u8>>)> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{}", self.base, path))
            .query(query);
        let timeout = match block {
            Some(b) => {
                let wait = format!("{}ms", b.wait.as_millis());
                req = req.query(&[("index", b.index.to_string()), ("wait", wait)]);
                b.wait + b.wait / 16 + PLAIN_TIMEOUT
            }
            None => PLAIN_TIMEOUT,
        };
        req = req.timeout(timeout);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        if let Some(body) = body {
            req = req.body(body);
        }
        let resp = req.send().await.map_err(|source| Error::Unreachable {
            addr: redact(&self.base),
            source: source.without_url(),
        })?;
        let status = resp.status();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bytes = resp.bytes().await.map_err(|source| Error::Unreachable {
            addr: redact(&self.base),
            source: source.without_url(),
        })?;
        if status == StatusCode::NOT_FOUND {
            return Ok((index, None));
        }
        if !status.is_success() {
            return Err(Error::Status {
                method: method_name(&method),
                path: path.to_string(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes)
                    .trim()
                    .chars()
                    .take(500)
                    .collect(),
            });
        }
        Ok((index, Some(bytes.to_vec())))
    }
}

/// A token from the variable `var`, else from the file named by `file_var` (trimmed);
/// `Ok(None)` when neither is set. Errors name the variable or the file, never the token.
pub fn token_from_env(
    var: &str,
    file_var: &str,
) -> std::result::Result<Option<String>, TokenError> {
    if let Some(t) = std::env::var(var).ok().filter(|t| !t.trim().is_empty()) {
        return Ok(Some(t.trim().to_string()));
    }
    let Some(path) = std::env::var_os(file_var).filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    let path = std::path::PathBuf::from(path);
    let text = std::fs::read_to_string(&path).map_err(|source| TokenError::Unreadable {
        var: file_var.to_string(),
        path: path.clone(),
        source,
    })?;
    let token = text.trim();
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(TokenError::NotOneToken {
            var: file_var.to_string(),
            path,
        });
    }
    Ok(Some(token.to_string()))
}

/// Why the ACL token named by the environment cannot be used (the token itself is never
/// part of the message).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{var}: cannot read {}: {source}", path.display())]
    Unreadable {
        var: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{var}: {} must hold one token on one line", path.display())]
    NotOneToken {
        var: String,
        path: std::path::PathBuf,
    },
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::POST => "POST",
        _ => "request",
    }
}

fn decode<T: serde::de::DeserializeOwned>(path: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Decode {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawKv {
    key: String,
    value: Option<String>,
    modify_index: u64,
    #[serde(default)]
    session: Option<String>,
}

impl RawKv {
    fn into_pair(self, path: &str) -> Result<KvPair> {
        let value = match self.value {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| Error::Decode {
                    path: path.to_string(),
                    reason: format!("KV value is not base64: {e}"),
                })?,
            None => Vec::new(),
        };
        Ok(KvPair {
            key: self.key,
            value,
            modify_index: self.modify_index,
            session: self.session,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawHealth {
    node: RawNode,
    service: RawService,
    #[serde(default)]
    checks: Vec<RawCheck>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNode {
    #[serde(default)]
    node: String,
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    #[serde(default)]
    address: String,
    port: u16,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    meta: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawCheck {
    status: String,
}

impl RawHealth {
    fn into_entry(self) -> ServiceEntry {
        let status = aggregate_status(self.checks.iter().map(|c| c.status.as_str()));
        ServiceEntry {
            id: self.service.id,
            name: self.service.service,
            node: self.node.node,
            // An empty service address means "the node's address" in Consul.
            address: if self.service.address.is_empty() {
                self.node.address
            } else {
                self.service.address
            },
            port: self.service.port,
            tags: self.service.tags.unwrap_or_default(),
            meta: self.service.meta.unwrap_or_default(),
            status: status.to_string(),
        }
    }
}

/// The worst of a set of check statuses, in Consul's order: critical > warning > passing.
fn aggregate_status<'a>(statuses: impl Iterator<Item = &'a str>) -> &'static str {
    let mut worst = "passing";
    for s in statuses {
        match s {
            "critical" => return "critical",
            "warning" => worst = "warning",
            "passing" => {}
            _ => worst = if worst == "passing" { "warning" } else { worst },
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_index_resets_when_it_goes_backwards() {
        assert_eq!(BlockingQuery::next_index(10, 12), 12);
        assert_eq!(BlockingQuery::next_index(10, 10), 10);
        assert_eq!(BlockingQuery::next_index(10, 3), 0);
        assert_eq!(BlockingQuery::next_index(0, 0), 1);
    }

    #[test]
    fn aggregate_status_takes_the_worst_check() {
        assert_eq!(
            aggregate_status(["passing", "passing"].into_iter()),
            "passing"
        );
        assert_eq!(
            aggregate_status(["passing", "warning"].into_iter()),
            "warning"
        );
        assert_eq!(
            aggregate_status(["warning", "critical", "passing"].into_iter()),
            "critical"
        );
        assert_eq!(aggregate_status(std::iter::empty()), "passing");
    }

    #[test]
    fn address_without_scheme_gets_http() {
        assert_eq!(
            ConsulClient::new("127.0.0.1:8500").unwrap().addr(),
            "http://127.0.0.1:8500"
        );
        assert_eq!(
            ConsulClient::new("http://127.0.0.1:8500/").unwrap().addr(),
            "http://127.0.0.1:8500"
        );
        assert!(matches!(
            ConsulClient::new("ftp://x"),
            Err(Error::InvalidAddress { .. })
        ));
    }

    #[test]
    fn health_entry_falls_back_to_node_address() {
        let raw: Vec<RawHealth> = serde_json::from_str(
            r#"[{"Node":{"Address":"10.0.0.1"},"Service":{"ID":"a","Service":"s","Address":"","Port":7,"Tags":null,"Meta":null},"Checks":[{"Status":"passing"},{"Status":"critical"}]}]"#,
        )
        .unwrap();
        let e = raw.into_iter().next().unwrap().into_entry();
        assert_eq!(e.address, "10.0.0.1");
        assert_eq!(e.status, "critical");
        assert!(e.tags.is_empty());
    }
}
