//! `scripts/test.sh` never runs on a cluster it did not start: with one running (here the
//! cluster of the test run itself), a second `scripts/test.sh` refuses at once, says how to
//! proceed, and changes nothing. Needs the cluster (scripts/test.sh starts it and runs this).

mod common;

use std::process::Command;

use common::repo_root;

fn nomad_jobs() -> String {
    let nomad = common::nomad_addr();
    reqwest::blocking::get(format!("{nomad}/v1/jobs"))
        .and_then(|r| r.text())
        .expect("nomad answers")
}

#[test]
#[ignore = "needs the cluster, model and corpus: run scripts/test.sh"]
fn test_sh_refuses_to_run_on_a_cluster_it_did_not_start() {
    let before = nomad_jobs();
    // Bounded: should the refusal ever break, the nested run is stopped after 60 s
    // instead of running the whole suite (and this test) again.
    let out = Command::new("timeout")
        .args(["60", "bash"])
        .arg(repo_root().join("scripts/test.sh"))
        .env_remove("SIMQ_TEST_REUSE_CLUSTER")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it ran: {said}");
    assert!(
        said.contains("a simq cluster is running") && said.contains("scripts/down.sh"),
        "{said}"
    );
    assert_eq!(nomad_jobs(), before, "nothing changed in Nomad");
}
