//! `simq-indexer build` and `eval`, for real: real model, ONNX Runtime and LMDB files.
//! Needs scripts/setup.sh (model, runtime) and scripts/corpus.sh (the real corpus sample
//! named by SIMQ_TEST_CORPUS); scripts/test.sh provides both.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sample_corpus(dir: &Path, lines: usize) -> PathBuf {
    let source = std::env::var("SIMQ_TEST_CORPUS")
        .expect("SIMQ_TEST_CORPUS names a real corpus sample (scripts/test.sh sets it)");
    let text = std::fs::read_to_string(&source).unwrap();
    let sample: Vec<&str> = text.lines().take(lines).collect();
    assert_eq!(sample.len(), lines, "{source} has fewer than {lines} lines");
    let path = dir.join("corpus.txt");
    std::fs::write(&path, sample.join("\n") + "\n").unwrap();
    path
}

fn indexer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_simq-indexer"))
        .args(args)
        .output()
        .expect("indexer runs")
}

fn build(corpus: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "build",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--shards",
        "3",
        "--clusters",
        "12",
    ];
    args.extend_from_slice(extra);
    indexer(&args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
#[ignore = "needs the model and corpus: run scripts/test.sh"]
fn building_twice_gives_byte_identical_files_and_the_same_dg() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = sample_corpus(tmp.path(), 400);
    let a = build(&corpus, &tmp.path().join("a"), &[]);
    assert!(a.status.success(), "{}", stderr(&a));
    let b = build(&corpus, &tmp.path().join("b"), &[]);
    assert!(b.status.success(), "{}", stderr(&b));
    let (dir_a, dir_b) = (PathBuf::from(stdout(&a)), PathBuf::from(stdout(&b)));
    assert_eq!(
        dir_a.file_name(),
        dir_b.file_name(),
        "same inputs, same dg id"
    );
    let dg = dir_a.file_name().unwrap().to_str().unwrap().to_string();
    assert!(dg.starts_with("dg-"));

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir_a.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["dg"], dg.as_str());
    assert_eq!(manifest["items"], 400);
    assert_eq!(manifest["dims"], 384);
    assert_eq!(manifest["shards"].as_array().unwrap().len(), 3);
    for name in [
        "manifest.json",
        "shard-0.lmdb",
        "shard-1.lmdb",
        "shard-2.lmdb",
    ] {
        let (x, y) = (
            std::fs::read(dir_a.join(name)).unwrap(),
            std::fs::read(dir_b.join(name)).unwrap(),
        );
        assert!(
            x == y,
            "{name} differs between two builds of the same inputs"
        );
    }

    // Rebuilding into the same place says so and changes nothing.
    let again = build(&corpus, &tmp.path().join("a"), &[]);
    assert!(again.status.success());
    assert!(
        stderr(&again).contains("unchanged (already built)"),
        "{}",
        stderr(&again)
    );

    // --force really rebuilds (embeddings come from the cache) and finds the same bytes.
    let forced = build(&corpus, &tmp.path().join("a"), &["--force"]);
    assert!(forced.status.success(), "{}", stderr(&forced));
    assert!(
        stderr(&forced).contains("embeddings reused"),
        "{}",
        stderr(&forced)
    );
    assert!(
        stderr(&forced).contains(&format!("dg {dg} unchanged (already built)")),
        "{}",
        stderr(&forced)
    );

    // A different corpus is a different dg.
    let other_dir = tmp.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = sample_corpus(&other_dir, 399);
    let c = build(&other, &tmp.path().join("c"), &[]);
    assert!(c.status.success());
    assert_ne!(PathBuf::from(stdout(&c)).file_name(), dir_a.file_name());

    // eval runs on the built dg and finds the self-excluded neighbours well.
    let e = indexer(&[
        "eval",
        dir_a.to_str().unwrap(),
        "--queries",
        "50",
        "--nprobe",
        "12",
    ]);
    assert!(e.status.success(), "{}", stderr(&e));
    let row = stdout(&e).lines().last().unwrap().to_string();
    let recall: f64 = row.split('|').nth(4).unwrap().trim().parse().unwrap();
    assert!(
        recall > 0.99,
        "recall@10 probing every cluster is exact, got {recall}: {row}"
    );
}

#[test]
#[ignore = "needs the model and corpus: run scripts/test.sh"]
fn bad_corpus_lines_stop_the_build_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("bad.txt");
    std::fs::write(
        &corpus,
        b"How do I sort a list?\nWhat is Rust?\n\nwhere is \xff here\nWho wrote Hamlet?\n",
    )
    .unwrap();
    let out = build(&corpus, &tmp.path().join("out"), &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    let path = corpus.display();
    assert!(err.contains(&format!("{path}:3: empty text")), "{err}");
    assert!(err.contains(&format!("{path}:4: not valid UTF-8")), "{err}");
    assert!(
        err.contains("2 bad lines") && err.contains("--skip-bad-lines"),
        "{err}"
    );
    assert!(
        !tmp.path().join("out").exists()
            || std::fs::read_dir(tmp.path().join("out"))
                .unwrap()
                .next()
                .is_none()
    );

    // With --skip-bad-lines the good lines build, and the bad ones are still listed.
    let out = build(&corpus, &tmp.path().join("out"), &["--skip-bad-lines"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("{path}:4: not valid UTF-8")));
    assert!(
        stderr(&out).contains("3 texts (0 duplicates dropped, 2 bad lines skipped)"),
        "{}",
        stderr(&out)
    );
}

#[test]
#[ignore = "needs the model: run scripts/test.sh"]
fn a_missing_corpus_or_too_few_texts_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = build(&tmp.path().join("nope.txt"), &tmp.path().join("out"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope.txt"), "{}", stderr(&out));

    let two = tmp.path().join("two.txt");
    std::fs::write(&two, "one question\nanother question\n").unwrap();
    let out = build(&two, &tmp.path().join("out"), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("2 usable texts for 3 shards"),
        "{}",
        stderr(&out)
    );
}
