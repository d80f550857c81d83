//! Reading a corpus file: one query per line (`.txt`), a TSV with a text column, or JSON
//! lines with a text field. Lines are validated (bad ones reported with their line
//! number) and de-duplicated (case and whitespace folded; the first spelling is kept).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Longest accepted text, in characters (longer texts are bad lines, not truncated).
pub const MAX_TEXT_CHARS: usize = 1000;

/// How to read the corpus file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// One text per line.
    Lines,
    /// Tab-separated with a header row; the text is in the named column.
    Tsv { column: String },
    /// One JSON object per line; the text is in the named string field.
    Jsonl { field: String },
}

impl Format {
    /// The format for a file name: `.tsv` -> Tsv, `.jsonl`/`.ndjson` -> Jsonl, else Lines.
    pub fn from_path(path: &Path, column: &str) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("tsv") => Format::Tsv {
                column: column.to_string(),
            },
            Some("jsonl" | "ndjson") => Format::Jsonl {
                field: column.to_string(),
            },
            _ => Format::Lines,
        }
    }
}

/// A line that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
}

/// The usable texts of a corpus file.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub path: PathBuf,
    /// De-duplicated texts; the position is the item id.
    pub texts: Vec<String>,
    pub bad: Vec<BadLine>,
    /// Lines dropped as duplicates of an earlier line.
    pub duplicates: usize,
}

impl Corpus {
    /// sha256 over the texts in order, one per line: the corpus part of a dg's identity.
    pub fn sha256(&self) -> String {
        texts_sha256(self.texts.iter().map(String::as_str))
    }

    /// "file:line: reason" for the first `limit` bad lines.
    pub fn bad_report(&self, limit: usize) -> String {
        let mut out: Vec<String> = self
            .bad
            .iter()
            .take(limit)
            .map(|b| format!("{}:{}: {}", self.path.display(), b.line, b.reason))
            .collect();
        if self.bad.len() > limit {
            out.push(format!("... and {} more bad lines", self.bad.len() - limit));
        }
        out.join("\n")
    }
}

/// sha256 over texts in order, one per line: a dg's `corpus_sha256`.
pub fn texts_sha256<'a>(texts: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Sha256::new();
    for t in texts {
        h.update(t.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// Errors that stop reading altogether (bad lines do not: they are collected).
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("cannot read corpus {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:1: TSV header has no column {column:?} (columns: {columns})")]
    NoSuchColumn {
        path: PathBuf,
        column: String,
        columns: String,
    },
}

/// Read and validate a corpus file.
pub fn read(path: &Path, format: &Format) -> Result<Corpus, CorpusError> {
    let io = |source| CorpusError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut reader = BufReader::new(file);
    let mut corpus = Corpus {
        path: path.to_path_buf(),
        texts: Vec::new(),
        bad: Vec::new(),
        duplicates: 0,
    };
    let mut seen = HashSet::new();
    let mut tsv_column = None;
    let mut raw = Vec::new();
    let mut line_no = 0;
    loop {
        raw.clear();
        if reader.read_until(b'\n', &mut raw).map_err(io)? == 0 {
            break;
        }
        line_no += 1;
        let mut bad = |reason: String| {
            corpus.bad.push(BadLine {
                line: line_no,
                reason,
            })
        };
        let Ok(line) = std::str::from_utf8(&raw) else {
            bad("not valid UTF-8".into());
            continue;
        };
        let line = line.trim_end_matches(['\n', '\r']);
        let text = match format {
            Format::Lines => line.to_string(),
            Format::Tsv { column } => {
                let cells: Vec<&str> = line.split('\t').collect();
                let Some(col) = tsv_column else {
                    let Some(col) = cells.iter().position(|c| c.trim() == column) else {
                        return Err(CorpusError::NoSuchColumn {
                            path: path.to_path_buf(),
                            column: column.clone(),
                            columns: cells.join(", "),
                        });
                    };
                    tsv_column = Some(col);
                    continue;
                };
                match cells.get(col) {
                    Some(c) => c.to_string(),
                    None => {
                        bad(format!(
                            "{} columns, the text column is number {}",
                            cells.len(),
                            col + 1
                        ));
                        continue;
                    }
                }
            }
            Format::Jsonl { field } => {
                if line.trim().is_empty() {
                    bad("empty line".into());
                    continue;
                }
                match serde_json::from_str::<serde_json::Value>(line) {
                    Ok(serde_json::Value::Object(o)) => match o.get(field) {
                        Some(serde_json::Value::String(s)) => s.clone(),
                        Some(other) => {
                            bad(format!("field {field:?} is not a string but {other}"));
                            continue;
                        }
                        None => {
                            bad(format!("no field {field:?}"));
                            continue;
                        }
                    },
                    Ok(_) => {
                        bad("not a JSON object".into());
                        continue;
                    }
                    Err(e) => {
                        bad(format!("invalid JSON: {e}"));
                        continue;
                    }
                }
            }
        };
        match validate(&text) {
            Err(reason) => bad(reason.to_string()),
            Ok(clean) => {
                if seen.insert(fold(&clean)) {
                    corpus.texts.push(clean);
                } else {
                    corpus.duplicates += 1;
                }
            }
        }
    }
    Ok(corpus)
}

/// Why a text cannot be indexed (reported as `FILE:LINE: reason`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadText {
    #[error("control character U+{:04X}", *.0 as u32)]
    ControlCharacter(char),
    #[error("empty text")]
    Empty,
    #[error("text has {0} characters, the limit is {MAX_TEXT_CHARS}")]
    TooLong(usize),
}

/// A usable text: trimmed, inner whitespace collapsed; or why it is not usable.
pub fn validate(text: &str) -> Result<String, BadText> {
    if let Some(c) = text.chars().find(|c| c.is_control() && !c.is_whitespace()) {
        return Err(BadText::ControlCharacter(c));
    }
    let clean = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if clean.is_empty() {
        return Err(BadText::Empty);
    }
    let chars = clean.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(BadText::TooLong(chars));
    }
    Ok(clean)
}

/// The de-duplication key: case-folded.
pub fn fold(text: &str) -> String {
    text.to_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(content: &[u8], name: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        (dir, p)
    }

    #[test]
    fn bad_lines_are_reported_with_line_numbers() {
        let mut content = b"How do I sort a list?\n\n".to_vec();
        content.extend_from_slice(b"bad \xff utf8\n");
        content.extend_from_slice(b"has a \x07 bell\n");
        content.extend_from_slice(format!("{}\n", "x".repeat(1001)).as_bytes());
        content.extend_from_slice(b"What is Rust?\n");
        let (_d, p) = write(&content, "c.txt");
        let c = read(&p, &Format::Lines).unwrap();
        assert_eq!(c.texts, vec!["How do I sort a list?", "What is Rust?"]);
        let lines: Vec<(usize, &str)> = c.bad.iter().map(|b| (b.line, b.reason.as_str())).collect();
        assert_eq!(
            lines,
            vec![
                (2, "empty text"),
                (3, "not valid UTF-8"),
                (4, "control character U+0007"),
                (5, "text has 1001 characters, the limit is 1000"),
            ]
        );
        assert!(c
            .bad_report(2)
            .starts_with(&format!("{}:2: empty text\n", p.display())));
        assert!(c.bad_report(2).ends_with("... and 2 more bad lines"));
    }

    #[test]
    fn duplicates_fold_case_and_whitespace_and_keep_the_first() {
        let (_d, p) = write(
            b"What is  Rust?\nwhat is rust?\n  WHAT IS RUST?  \nOther\n",
            "c.txt",
        );
        let c = read(&p, &Format::Lines).unwrap();
        assert_eq!(c.texts, vec!["What is Rust?", "Other"]);
        assert_eq!(c.duplicates, 2);
    }

    #[test]
    fn tsv_reads_the_named_column_and_reports_short_rows() {
        let (_d, p) = write(
            b"id\tquery\n1\tfirst question\n2\n3\tthird question\n",
            "c.tsv",
        );
        let c = read(&p, &Format::from_path(&p, "query")).unwrap();
        assert_eq!(c.texts, vec!["first question", "third question"]);
        assert_eq!(
            c.bad,
            vec![BadLine {
                line: 3,
                reason: "1 columns, the text column is number 2".into()
            }]
        );
        let err = read(
            &p,
            &Format::Tsv {
                column: "text".into(),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("c.tsv:1: TSV header has no column \"text\" (columns: id, query)"),
            "{err}"
        );
    }

    #[test]
    fn jsonl_reads_the_field_and_names_json_problems() {
        let (_d, p) = write(
            b"{\"text\": \"one\"}\n{\"text\": 5}\n{oops\n[1]\n{\"q\": \"x\"}\n",
            "c.jsonl",
        );
        let c = read(&p, &Format::from_path(&p, "text")).unwrap();
        assert_eq!(c.texts, vec!["one"]);
        let reasons: Vec<&str> = c.bad.iter().map(|b| b.reason.as_str()).collect();
        assert_eq!(reasons[0], "field \"text\" is not a string but 5");
        assert!(reasons[1].starts_with("invalid JSON"));
        assert_eq!(reasons[2], "not a JSON object");
        assert_eq!(reasons[3], "no field \"text\"");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = read(Path::new("/no/such/corpus.txt"), &Format::Lines)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/no/such/corpus.txt"), "{err}");
    }
}

/// Hostile input: a corpus file of any bytes, in every format, is read into good texts and
/// numbered bad lines, never a panic; every kept text passes the rules.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_file_gives_texts_and_numbered_bad_lines(
            lines in proptest::collection::vec(
                prop_oneof![
                    any::<String>().prop_map(String::into_bytes),
                    proptest::collection::vec(any::<u8>(), 0..80),
                    Just(b"text\tother".to_vec()),
                    Just(br#"{"text": "a question?"}"#.to_vec()),
                ],
                0..30,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("corpus");
            let content = lines.join(&b'\n');
            std::fs::write(&path, &content).unwrap();
            // (Generated lines may hold newlines of their own.)
            let line_count = content.split(|&b| b == b'\n').count();
            for format in [
                Format::Lines,
                Format::Tsv { column: "text".into() },
                Format::Jsonl { field: "text".into() },
            ] {
                match read(&path, &format) {
                    Ok(c) => {
                        for t in &c.texts {
                            prop_assert!(!t.trim().is_empty());
                            prop_assert!(!t.chars().any(char::is_control));
                        }
                        for b in &c.bad {
                            prop_assert!(b.line >= 1 && b.line <= line_count, "line {} of {line_count}", b.line);
                        }
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }
        }
    }
}
