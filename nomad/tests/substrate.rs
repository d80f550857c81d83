//! Proves the local cluster substrate for real: a raw_exec Nomad job registers a service in
//! Consul with an HTTP check, simq's Consul client sees it `passing` through a blocking
//! health query, and after the job stops the service is gone.
//!
//! Needs the agents of `scripts/cluster.sh start`; `scripts/test.sh` starts them and runs
//! the ignored tests.

use std::time::{Duration, Instant};

use simq_consul::{BlockingQuery, ConsulClient, ServiceEntry};
use simq_nomad::{hcl_variables, NomadClient};

const JOB_FILE: &str = include_str!("substrate.nomad.hcl");
const JOB_ID: &str = "simq-substrate";
const SERVICE: &str = "simq-substrate";

/// Follow `/v1/health/service/<SERVICE>` with blocking queries until `done` holds for the
/// instances, or fail after `limit`.
async fn follow_service(
    consul: &ConsulClient,
    passing_only: bool,
    limit: Duration,
    done: impl Fn(&[ServiceEntry]) -> bool,
) -> Vec<ServiceEntry> {
    let deadline = Instant::now() + limit;
    let mut index = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "service {SERVICE} did not reach the expected state within {limit:?}"
        );
        let block = BlockingQuery {
            index,
            wait: left.min(Duration::from_secs(5)),
        };
        let answer = consul
            .health_service(SERVICE, passing_only, Some(block))
            .await
            .expect("Consul health query");
        if done(&answer.value) {
            return answer.value;
        }
        index = BlockingQuery::next_index(index, answer.index);
    }
}

fn python3() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 must be on PATH for the substrate job");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
#[ignore = "needs the local cluster: run scripts/test.sh"]
async fn raw_exec_job_registers_passing_service_and_deregisters_on_stop() {
    let consul = ConsulClient::from_env().unwrap();
    let nomad = NomadClient::from_env().unwrap();
    nomad.stop_job(JOB_ID, true).await.unwrap();

    let python = python3();
    let vars = hcl_variables([("python", python.as_str()), ("service_name", SERVICE)]);
    let job = nomad.parse_job(JOB_FILE, &vars).await.expect("job parses");
    assert_eq!(job["ID"], JOB_ID);
    let reg = nomad.register_job(&job).await.expect("job registers");
    assert!(!reg.eval_id.is_empty());

    let passing = follow_service(&consul, true, Duration::from_secs(60), |s| !s.is_empty()).await;
    let inst = &passing[0];
    assert_eq!(inst.status, "passing");
    assert_eq!(
        inst.address, "127.0.0.1",
        "services must register on loopback"
    );
    assert!(inst.tags.iter().any(|t| t == "simq-test"));

    // The check is real: the task answers HTTP on the registered address.
    let url = format!("http://{}:{}/", inst.address, inst.port);
    let status = reqwest::get(&url).await.expect("task answers").status();
    assert!(status.is_success(), "GET {url} answered {status}");

    // The client reports alloc status to the server in batches: Consul may see the
    // check pass before the server sees the alloc running.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let allocs = nomad.job_allocations(JOB_ID).await.unwrap();
        if allocs.iter().any(|a| a.client_status == "running") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no running allocation reported: {allocs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    nomad.stop_job(JOB_ID, true).await.unwrap();
    let left = follow_service(&consul, false, Duration::from_secs(30), |s| s.is_empty()).await;
    assert!(left.is_empty());
    assert!(
        nomad.job(JOB_ID).await.unwrap().is_none(),
        "purged job is gone"
    );
}
