//! Async Nomad HTTP API client: jobs, deployments and allocations.
//!
//! Jobs travel as `serde_json::Value`: Nomad's job struct is large and simq never edits
//! it field by field; it parses HCL2 files with variables and registers the result.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};

const PLAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// What `POST /v1/jobs` answered.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Registration {
    #[serde(rename = "EvalID")]
    pub eval_id: String,
    pub job_modify_index: u64,
}

/// A job in `GET /v1/jobs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct JobStub {
    #[serde(rename = "ID")]
    pub id: String,
    pub status: String,
    /// Listed across namespaces (`namespace=*`), the job's namespace.
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub job_modify_index: u64,
}

/// An allocation, with what simq reads of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Allocation {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    pub task_group: String,
    pub client_status: String,
    pub desired_status: String,
    /// The Nomad client node it is placed on, e.g. `n2`.
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub job_version: u64,
    #[serde(default)]
    pub deployment_status: Option<AllocDeploymentStatus>,
    #[serde(default)]
    pub task_states: Option<BTreeMap<String, TaskState>>,
}

impl Allocation {
    /// Its client runs it or is about to: its tasks may still hold ports and files.
    pub fn is_running_or_pending(&self) -> bool {
        matches!(self.client_status.as_str(), "running" | "pending")
    }
}

/// An allocation's standing in its deployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AllocDeploymentStatus {
    pub healthy: Option<bool>,
    #[serde(default)]
    pub canary: bool,
}

/// A task's state inside an allocation.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TaskState {
    pub state: String,
    #[serde(default)]
    pub failed: bool,
    #[serde(default)]
    pub events: Option<Vec<TaskEvent>>,
}

/// One task event ("Failed Artifact Download", "Started", ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TaskEvent {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(default)]
    pub display_message: String,
}

impl Allocation {
    /// Task events of every task, in order, as "task: Type: message" lines.
    pub fn event_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (task, state) in self.task_states.iter().flatten() {
            for ev in state.events.iter().flatten() {
                out.push(format!("{task}: {}: {}", ev.kind, ev.display_message));
            }
        }
        out
    }
}

/// A deployment and its per-group progress.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Deployment {
    #[serde(rename = "ID")]
    pub id: String,
    pub job_version: u64,
    pub status: DeploymentStatus,
    #[serde(default)]
    pub status_description: String,
    #[serde(default)]
    pub task_groups: BTreeMap<String, DeploymentGroup>,
    #[serde(default)]
    pub modify_index: u64,
}

/// A deployment's `Status` as Nomad reports it; a status this client does not know is kept
/// by name (`Other`) and counts as neither live nor ended.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum DeploymentStatus {
    Pending,
    Running,
    Paused,
    Successful,
    Failed,
    Cancelled,
    Other(String),
}

impl DeploymentStatus {
    /// Still placing or waiting for health (or paused by an operator): it may yet succeed.
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Pending | Self::Running | Self::Paused)
    }

    /// Ended without succeeding.
    pub fn is_failed(&self) -> bool {
        matches!(self, Self::Failed | Self::Cancelled)
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Successful => "successful",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Other(s) => s,
        }
    }
}

impl From<String> for DeploymentStatus {
    fn from(s: String) -> Self {
        match s.as_str() {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "successful" => Self::Successful,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => Self::Other(s),
        }
    }
}

impl From<&str> for DeploymentStatus {
    fn from(s: &str) -> Self {
        s.to_string().into()
    }
}

impl std::fmt::Display for DeploymentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One task group's progress in a deployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DeploymentGroup {
    #[serde(default)]
    pub desired_total: u32,
    #[serde(default)]
    pub desired_canaries: u32,
    #[serde(default)]
    pub placed_allocs: u32,
    #[serde(default)]
    pub healthy_allocs: u32,
    #[serde(default)]
    pub unhealthy_allocs: u32,
    #[serde(default)]
    pub promoted: bool,
}

/// Render variables for `POST /v1/jobs/parse` (an HCL variable file). Values are quoted
/// HCL strings; `${` and `%{` are escaped so a value is never read as a template.
pub fn hcl_variables<'a>(vars: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (name, value) in vars {
        let quoted = serde_json::to_string(value).expect("a string always serialises");
        let quoted = quoted.replace("${", "$${").replace("%{", "%%{");
        out.push_str(&format!("{name} = {quoted}\n"));
    }
    out
}

/// A Nomad agent's HTTP API.
#[derive(Debug, Clone)]
pub struct NomadClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    /// The Nomad namespace of every call (`NOMAD_NAMESPACE`); None: Nomad's default.
    namespace: Option<String>,
}

impl NomadClient {
    /// A client for the agent at `addr` (`http://127.0.0.1:4646` or `127.0.0.1:4646`).
    pub fn new(addr: &str) -> Result<Self> {
        let base = if addr.contains("://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", addr.trim_end_matches('/'))
        };
        let invalid = |reason: String| Error::InvalidAddress {
            addr: simq_runtime::redact::redact(addr),
            reason,
        };
        let url = reqwest::Url::parse(&base).map_err(|e| invalid(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(invalid("not an http(s) URL with a host".into()));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Self {
            http,
            base,
            token: None,
            namespace: None,
        })
    }

    /// Take the ACL token from `NOMAD_TOKEN` (as the `nomad` CLI does), else from the file
    /// named by `NOMAD_TOKEN_FILE`; none when neither is set. Sent, never printed.
    pub fn with_env_token(mut self) -> std::result::Result<Self, simq_consul::client::TokenError> {
        self.token = simq_consul::client::token_from_env("NOMAD_TOKEN", "NOMAD_TOKEN_FILE")?;
        Ok(self)
    }

    /// Work in the namespace named by `NOMAD_NAMESPACE` (as the `nomad` CLI does): every
    /// call names it and jobs are registered into it. Unset or empty: Nomad's default.
    pub fn with_env_namespace(mut self) -> Self {
        self.namespace = std::env::var("NOMAD_NAMESPACE")
            .ok()
            .filter(|n| !n.trim().is_empty());
        self
    }

    /// The namespace calls go to, when one was set.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// A client configured like the `nomad` CLI: `NOMAD_ADDR`, default `http://127.0.0.1:4646`.
    pub fn from_env() -> Result<Self> {
        Self::new(&std::env::var("NOMAD_ADDR").unwrap_or_else(|_| "http://127.0.0.1:4646".into()))
    }

    /// The agent's base URL, without any user:password (fit to print).
    pub fn addr(&self) -> String {
        simq_runtime::redact::redact(&self.base)
    }

    /// Parse an HCL2 job file with variables (see [`hcl_variables`]) into job JSON.
    pub async fn parse_job(&self, hcl: &str, variables: &str) -> Result<Value> {
        let body = json!({"JobHCL": hcl, "Canonicalize": true, "Variables": variables});
        self.call(Method::POST, "/v1/jobs/parse", Some(body)).await
    }

    /// Register (create or update) a job from its JSON.
    pub async fn register_job(&self, job: &Value) -> Result<Registration> {
        let mut job = job.clone();
        if let Some(ns) = &self.namespace {
            job["Namespace"] = json!(ns);
        }
        let v = self
            .call(Method::POST, "/v1/jobs", Some(json!({ "Job": job })))
            .await?;
        decode("/v1/jobs", v)
    }

    /// Ask Nomad to validate a job (from [`NomadClient::parse_job`]); the error lists
    /// every problem Nomad found.
    pub async fn validate_job(&self, job: &Value) -> Result<()> {
        let v = self
            .call(
                Method::POST,
                "/v1/validate/job",
                Some(json!({ "Job": job })),
            )
            .await?;
        let errors: Vec<String> = v["ValidationErrors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if errors.is_empty() && v["Error"].as_str().unwrap_or("").is_empty() {
            return Ok(());
        }
        Err(Error::Status {
            method: "POST".into(),
            path: "/v1/validate/job".into(),
            status: 200,
            body: format!(
                "{} {}",
                errors.join("; "),
                v["Error"].as_str().unwrap_or("")
            ),
        })
    }

    /// Every job the agent knows.
    pub async fn list_jobs(&self) -> Result<Vec<JobStub>> {
        let v = self.call(Method::GET, "/v1/jobs", None).await?;
        decode("/v1/jobs", v)
    }

    /// One job's full JSON; `None` when it does not exist.
    pub async fn job(&self, id: &str) -> Result<Option<Value>> {
        match self.call(Method::GET, &format!("/v1/job/{id}"), None).await {
            Ok(v) => Ok(Some(v)),
            Err(Error::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stop a job; `purge` also removes it from Nomad's state at once.
    pub async fn stop_job(&self, id: &str, purge: bool) -> Result<()> {
        let path = format!("/v1/job/{id}?purge={purge}");
        match self.call(Method::DELETE, &path, None).await {
            Ok(_) | Err(Error::Status { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The same client in namespace `ns` ("*": every namespace, for listings).
    pub fn in_namespace(&self, ns: &str) -> Self {
        Self {
            namespace: Some(ns.to_string()),
            ..self.clone()
        }
    }

    /// Stop every job whose id starts with `prefix`, in every namespace the token may see;
    /// wait (at most `limit`) until their tasks have really ended, since a purge alone
    /// returns at once while an old task can still hold its port; then purge them. The
    /// one way simq stops its jobs: `simq-indexer stop-jobs` (scripts/cluster.sh stop)
    /// and the system tests. Returns the ids stopped.
    pub async fn stop_jobs(&self, prefix: &str, limit: Duration) -> Result<Vec<String>> {
        let jobs: Vec<(String, Self)> = self
            .in_namespace("*")
            .list_jobs()
            .await?
            .into_iter()
            .filter(|j| j.id.starts_with(prefix))
            .map(|j| {
                let ns = if j.namespace.is_empty() {
                    "default".to_string()
                } else {
                    j.namespace
                };
                (j.id, self.in_namespace(&ns))
            })
            .collect();
        for (id, client) in &jobs {
            client.stop_job(id, false).await?;
        }
        let deadline = tokio::time::Instant::now() + limit;
        for (id, client) in &jobs {
            while tokio::time::Instant::now() < deadline
                && client
                    .job_allocations(id)
                    .await?
                    .iter()
                    .any(Allocation::is_running_or_pending)
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            client.stop_job(id, true).await?;
        }
        Ok(jobs.into_iter().map(|(id, _)| id).collect())
    }

    /// Why task groups of `job` could not be placed, from its evaluations (newest
    /// first): "group: dimension exhausted ..." lines, empty when everything was placed.
    pub async fn placement_failures(&self, job: &str) -> Result<Vec<String>> {
        let path = format!("/v1/job/{job}/evaluations");
        let evals = self.call(Method::GET, &path, None).await?;
        let mut out = Vec::new();
        for eval in evals.as_array().into_iter().flatten().take(5) {
            for (group, metric) in eval["FailedTGAllocs"].as_object().into_iter().flatten() {
                let mut why: Vec<String> = Vec::new();
                for key in ["DimensionExhausted", "ConstraintFiltered", "ClassExhausted"] {
                    for (what, n) in metric[key].as_object().into_iter().flatten() {
                        why.push(format!("{what} ({n} node(s))"));
                    }
                }
                let line = format!("{group} not placed: {}", why.join(", "));
                if !out.contains(&line) {
                    out.push(line);
                }
            }
        }
        Ok(out)
    }

    /// A job's allocations (all versions, including stopped ones).
    pub async fn job_allocations(&self, id: &str) -> Result<Vec<Allocation>> {
        let path = format!("/v1/job/{id}/allocations");
        let v = self.call(Method::GET, &path, None).await?;
        decode(&path, v)
    }

    /// One allocation in full (task events included).
    pub async fn allocation(&self, id: &str) -> Result<Allocation> {
        let path = format!("/v1/allocation/{id}");
        let v = self.call(Method::GET, &path, None).await?;
        decode(&path, v)
    }

    /// The job's most recent deployment, `None` when it has had none.
    pub async fn latest_deployment(&self, job: &str) -> Result<Option<Deployment>> {
        let path = format!("/v1/job/{job}/deployment");
        let v = self.call(Method::GET, &path, None).await?;
        if v.is_null() {
            return Ok(None);
        }
        decode(&path, v).map(Some)
    }

    /// Promote a deployment's canaries.
    pub async fn promote_deployment(&self, deployment: &str) -> Result<()> {
        let path = format!("/v1/deployment/promote/{deployment}");
        self.call(
            Method::POST,
            &path,
            Some(json!({"DeploymentID": deployment, "All": true})),
        )
        .await
        .map(|_| ())
    }

    /// Mark a deployment failed; with `auto_revert` Nomad then reverts the job to its last
    /// stable version (unpromoted canaries stop).
    pub async fn fail_deployment(&self, deployment: &str) -> Result<()> {
        let path = format!("/v1/deployment/fail/{deployment}");
        self.call(
            Method::POST,
            &path,
            Some(json!({"DeploymentID": deployment})),
        )
        .await
        .map(|_| ())
    }

    /// The last `bytes` of a task's stderr (`stderr = false`: stdout), as text.
    pub async fn task_log_tail(
        &self,
        alloc: &str,
        task: &str,
        stderr: bool,
        bytes: u64,
    ) -> Result<String> {
        let kind = if stderr { "stderr" } else { "stdout" };
        let path = format!("/v1/client/fs/logs/{alloc}?task={task}&type={kind}&plain=true&origin=end&offset={bytes}");
        let resp = self
            .request(Method::GET, &path)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            return Err(Error::Status {
                method: "GET".into(),
                path,
                status: status.as_u16(),
                body: text,
            });
        }
        Ok(text)
    }

    /// A request to `path` with the timeout, the namespace and the token (`X-Nomad-Token`)
    /// set.
    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .timeout(PLAIN_TIMEOUT);
        if let Some(ns) = &self.namespace {
            req = req.query(&[("namespace", ns)]);
        }
        match &self.token {
            Some(t) => req.header("X-Nomad-Token", t),
            None => req,
        }
    }

    /// A transport error, with no credentials in the address or the URL.
    fn unreachable(&self, source: reqwest::Error) -> Error {
        Error::Unreachable {
            addr: self.addr(),
            source: source.without_url(),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self.request(method.clone(), path);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        if !status.is_success() {
            return Err(Error::Status {
                method: method.to_string(),
                path: path.to_string(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes)
                    .trim()
                    .chars()
                    .take(2000)
                    .collect(),
            });
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode {
            path: path.to_string(),
            reason: e.to_string(),
        })
    }
}

fn decode<T: serde::de::DeserializeOwned>(path: &str, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Decode {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_quoted_and_never_templates() {
        let vars = hcl_variables([("a", "plain"), ("b", "say \"hi\"\n"), ("c", "${oops} %{x}")]);
        assert_eq!(
            vars,
            "a = \"plain\"\nb = \"say \\\"hi\\\"\\n\"\nc = \"$${oops} %%{x}\"\n"
        );
    }

    #[test]
    fn event_lines_name_task_and_type() {
        let alloc: Allocation = serde_json::from_value(json!({
            "ID": "a1", "Name": "j.g[0]", "TaskGroup": "g", "ClientStatus": "failed",
            "DesiredStatus": "run",
            "TaskStates": {"shard": {"State": "dead", "Failed": true, "Events": [
                {"Type": "Failed Artifact Download", "DisplayMessage": "Checksums did not match"}
            ]}}
        }))
        .unwrap();
        assert_eq!(
            alloc.event_lines(),
            vec!["shard: Failed Artifact Download: Checksums did not match".to_string()]
        );
    }
}
