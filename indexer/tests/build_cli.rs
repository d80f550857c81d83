//! `simq-indexer build` and `eval`, for real: real model, ONNX Runtime and LMDB files.
//! Needs scripts/setup.sh (model, runtime) and scripts/corpus.sh (the real corpus sample
//! named by SIMQ_TEST_CORPUS); scripts/test.sh provides both.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The first `lines` lines of the real corpus sample, as `dir/corpus.txt`.
fn sample_corpus(dir: &Path, lines: usize) -> PathBuf {
    write_lines(&dir.join("corpus.txt"), &corpus_lines(lines))
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

/// The first `n` lines of the real corpus sample.
fn corpus_lines(n: usize) -> Vec<String> {
    let source = std::env::var("SIMQ_TEST_CORPUS")
        .expect("SIMQ_TEST_CORPUS names a real corpus sample (scripts/test.sh sets it)");
    let text = std::fs::read_to_string(&source).unwrap();
    let lines: Vec<String> = text.lines().take(n).map(str::to_string).collect();
    assert_eq!(lines.len(), n, "{source} has fewer than {n} lines");
    lines
}

fn write_lines(path: &Path, lines: &[String]) -> PathBuf {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    path.to_path_buf()
}

fn manifest_of(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// `build --base BASE` with `extra`, into `out`; the dg directory it prints.
fn update(base: &Path, out: &Path, extra: &[&str]) -> (PathBuf, String) {
    let mut args = vec![
        "build",
        "--base",
        base.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = indexer(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    (PathBuf::from(stdout(&o)), stderr(&o))
}

#[test]
#[ignore = "needs the model and corpus: run scripts/test.sh"]
fn an_incremental_build_rewrites_only_the_changed_shards_and_never_holds_a_removed_text() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = corpus_lines(1201);
    let base_corpus = write_lines(&tmp.path().join("base.txt"), &lines[..1200]);
    let b = indexer(&[
        "build",
        base_corpus.to_str().unwrap(),
        "--out",
        tmp.path().join("base").to_str().unwrap(),
        "--shards",
        "4",
        "--clusters",
        "40",
    ]);
    assert!(b.status.success(), "{}", stderr(&b));
    let base_dir = PathBuf::from(stdout(&b));
    let base = manifest_of(&base_dir);

    // One text in, one out.
    let (added, removed) = (lines[1200].clone(), lines[5].clone());
    let add = write_lines(&tmp.path().join("add.txt"), std::slice::from_ref(&added));
    let remove = write_lines(
        &tmp.path().join("remove.txt"),
        std::slice::from_ref(&removed),
    );
    let change = [
        "--add",
        add.to_str().unwrap(),
        "--remove",
        remove.to_str().unwrap(),
    ];
    let (dir, log) = update(&base_dir, &tmp.path().join("u1"), &change);
    let m = manifest_of(&dir);
    assert_eq!(m["build"]["base"]["dg"], base["dg"], "{log}");
    assert_eq!(
        (
            m["build"]["base"]["added"].as_u64(),
            m["build"]["base"]["removed"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(m["items"], 1200);
    assert_eq!(
        m["clusters"], base["clusters"],
        "the base's centroids are kept"
    );
    let rewritten: Vec<u64> = m["build"]["base"]["shards_rewritten"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert!(
        !rewritten.is_empty() && rewritten.len() <= 2,
        "{rewritten:?}"
    );
    for s in 0..4u64 {
        let (new, old) = (&m["shards"][s as usize], &base["shards"][s as usize]);
        if rewritten.contains(&s) {
            assert_ne!(new["sha256"], old["sha256"], "shard {s} changed");
        } else {
            assert_eq!(new, old, "an unchanged shard keeps its entry and sha256");
            let name = format!("shard-{s}.lmdb");
            assert!(
                std::fs::read(dir.join(&name)).unwrap()
                    == std::fs::read(base_dir.join(&name)).unwrap()
            );
        }
    }

    // Same base and change set, same bytes.
    let (again, _) = update(&base_dir, &tmp.path().join("u2"), &change);
    assert_eq!(again.file_name(), dir.file_name());
    for s in 0..4 {
        let name = format!("shard-{s}.lmdb");
        assert!(
            std::fs::read(dir.join(&name)).unwrap() == std::fs::read(again.join(&name)).unwrap()
        );
    }
    // The same change given as a new full corpus (diffed against the base) is the same dg.
    let mut full: Vec<String> = lines[..1200]
        .iter()
        .filter(|l| **l != removed)
        .cloned()
        .collect();
    full.push(added.clone());
    let full = write_lines(&tmp.path().join("full.txt"), &full);
    let (diffed, _) = update(&base_dir, &tmp.path().join("u3"), &[full.to_str().unwrap()]);
    assert_eq!(diffed.file_name(), dir.file_name());

    // The removed text is in no shard, by text, by BM25 or by its own vector; the added
    // one is found.
    let old = simq_indexer::eval::DgDir::open(&base_dir).unwrap();
    let removed_vector = old
        .items()
        .unwrap()
        .into_iter()
        .find(|i| old.shards[i.shard].text(i.id).unwrap().as_deref() == Some(removed.as_str()))
        .expect("the base holds the removed text")
        .vector;
    let new = simq_indexer::eval::DgDir::open(&dir).unwrap();
    let mut found_added = false;
    for file in &new.shards {
        let texts = file.texts().unwrap();
        assert!(texts.iter().all(|(_, t)| *t != removed));
        found_added |= texts.iter().any(|(_, t)| *t == added);
        for hit in file.lexical_search(&removed, 10).unwrap() {
            assert_ne!(hit.text, removed);
        }
        for hit in file.search(&removed_vector, 10, &[]).unwrap() {
            assert_ne!(hit.text, removed);
        }
    }
    assert!(found_added);
    let top = new
        .shards
        .iter()
        .flat_map(|f| f.lexical_search(&added, 1).unwrap())
        .map(|h| h.text);
    assert!(top.into_iter().any(|t| t == added));
}

#[test]
#[ignore = "needs the model and corpus: run scripts/test.sh"]
fn the_drift_guard_rebuilds_in_full_when_a_change_crowds_one_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = sample_corpus(tmp.path(), 600);
    let b = build(&corpus, &tmp.path().join("base"), &[]);
    assert!(b.status.success(), "{}", stderr(&b));
    let base_dir = PathBuf::from(stdout(&b));
    let base = manifest_of(&base_dir);
    // Half as many texts again, all on one narrow topic.
    let skewed: Vec<String> = (1..=300)
        .map(|n| format!("how many calories are in {n} grams of cooked white rice"))
        .collect();
    let add = write_lines(&tmp.path().join("add.txt"), &skewed);
    let (dir, log) = update(
        &base_dir,
        &tmp.path().join("u"),
        &["--add", add.to_str().unwrap()],
    );
    assert!(
        log.contains("drift:") && log.contains("largest cluster"),
        "{log}"
    );
    let m = manifest_of(&dir);
    assert!(m["build"].get("base").is_none(), "a full rebuild: {log}");
    assert_ne!(
        m["clusters"]["centroids_sha256"],
        base["clusters"]["centroids_sha256"]
    );
    assert_eq!(m["items"], 900);
    // Told to keep the centroids, it does, and says how far they drifted.
    let (kept, log) = update(
        &base_dir,
        &tmp.path().join("k"),
        &["--add", add.to_str().unwrap(), "--allow-drift"],
    );
    let k = manifest_of(&kept);
    assert_eq!(k["build"]["base"]["dg"], base["dg"], "{log}");
    assert_eq!(k["clusters"], base["clusters"]);
    assert!(log.contains("largest cluster"), "{log}");
}

#[test]
#[ignore = "needs the model and corpus: run scripts/test.sh"]
fn a_chain_of_incremental_builds_rebuilds_in_full_once_it_adds_a_fifth_to_the_last_full_build() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = corpus_lines(750);
    let base_corpus = write_lines(&tmp.path().join("base.txt"), &lines[..600]);
    let b = build(&base_corpus, &tmp.path().join("base"), &[]);
    assert!(b.status.success(), "{}", stderr(&b));
    let base_dir = PathBuf::from(stdout(&b));
    let base = manifest_of(&base_dir);
    // +90 texts of the same corpus (15 %), the centroids kept (on 12 clusters the new
    // texts fit less well than those k-means saw, so this step is told to keep them).
    let add = write_lines(&tmp.path().join("add1.txt"), &lines[600..690]);
    let (step1, log) = update(
        &base_dir,
        &tmp.path().join("s1"),
        &["--add", add.to_str().unwrap(), "--allow-drift"],
    );
    let m1 = manifest_of(&step1);
    assert_eq!(m1["build"]["base"]["dg"], base["dg"], "{log}");
    // +60 more on top (9 % of step 1, 25 % of the last full build): a full rebuild, and
    // the reason names the change since the last full build.
    let add = write_lines(&tmp.path().join("add2.txt"), &lines[690..750]);
    let (step2, log) = update(
        &step1,
        &tmp.path().join("s2"),
        &["--add", add.to_str().unwrap()],
    );
    assert!(
        log.contains("750 texts, 25 % more than the 600") && log.contains("last full build"),
        "{log}"
    );
    let m2 = manifest_of(&step2);
    assert!(m2["build"].get("base").is_none(), "a full rebuild: {log}");
    assert_eq!(m2["items"], 750);
}
