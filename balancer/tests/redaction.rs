//! No credentials in what the balancer prints: the real binary, given a Consul address
//! with a user and password that answers nothing, reports the failure in /v1/status and
//! its log with the address redacted. Runs in plain `cargo test` (no cluster needed).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use simq_testkit::{free_port, KillOnDrop as Running};

#[test]
fn a_consul_password_never_shows_in_status_or_logs() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens, every watch call fails at once.
    let consul = "http://simq-user:hunter2-secret@127.0.0.1:1";
    let mut balancer = Running(
        Command::new(env!("CARGO_BIN_EXE_simq-balancer"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--consul", consul])
            .args([
                "--upgrade-sock",
                dir.path().join("upgrade.sock").to_str().unwrap(),
            ])
            .args(["--consul-wait-secs", "1"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the balancer binary starts"),
    );
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let answer = client
            .get(format!("http://127.0.0.1:{port}/v1/status"))
            .send()
            .and_then(|r| r.text());
        if let Ok(text) = answer {
            if text.contains("unreachable") {
                break text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no Consul error in /v1/status within 20 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(status.contains("http://***@127.0.0.1:1"), "{status}");
    assert!(
        !status.contains("hunter2"),
        "the password in /v1/status: {status}"
    );
    assert!(
        !status.contains("simq-user"),
        "the user in /v1/status: {status}"
    );

    let _ = balancer.0.kill();
    let mut log = String::new();
    balancer
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("consul watch failed"), "{log}");
    assert!(!log.contains("hunter2"), "the password in the log: {log}");
}
