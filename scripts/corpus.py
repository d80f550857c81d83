#!/usr/bin/env python3
"""simq's demo and benchmark corpus: real search queries from the query sets ("topics")
of well-known retrieval benchmarks, as packaged in the PyPI wheel pyserini (inside
pyserini/resources/jars/anserini-<version>-fatjar.jar, under topics-and-qrels/).

    corpus.py extract WHEEL OUT.tsv
    corpus.py test-corpus WHEEL OUT.txt N

writes a TSV with a header row and two columns, `text` (the query, whitespace folded)
and `source` (the topic file it came from, e.g. `dpr.squad.test`), one row per query
that is unique after case and whitespace folding and has at least MIN_WORDS words. The
order is the order of SOURCES, then of each file: the same wheel gives the same bytes.
A summary per group goes to stderr.

test-corpus writes N queries, one per line, drawn with a fixed seed from the sources whose
licences allow redistribution (OPEN_SOURCES), in a shuffled order so that any slice of it
mixes the sources: the test corpus the repo carries (testdata/corpus/).

Each group's licence is named in GROUPS; README.md "Corpus" repeats them.
"""

import gzip
import io
import json
import random
import sys
import zipfile

MIN_WORDS = 3
TEST_CORPUS_SEED = 20261206
# simq-indexer refuses longer texts (indexer/src/corpus.rs MAX_TEXT_CHARS).
MAX_CHARS = 1000

# group -> (what it is, licence)
GROUPS = {
    "qa": ("QA-benchmark questions: TriviaQA, SQuAD, Natural Questions, WebQuestions, "
           "CuratedTREC, Mr.TyDi and MIRACL (English), HotpotQA, FiQA, BioASQ, TREC-COVID, Touche",
           "each dataset's own: SQuAD and HotpotQA CC BY-SA 4.0, NQ CC BY-SA 3.0, WebQuestions CC BY 4.0, "
           "TriviaQA Apache-2.0, Mr.TyDi and MIRACL Apache-2.0, BEIR sets as BEIR lists them"),
    "quora": ("Quora questions (BEIR)", "Quora's terms: non-commercial research"),
    "stackexchange": ("StackExchange titles (BEIR CQADupStack, 12 sites)", "CC BY-SA (StackExchange data dump)"),
    "bing": ("Bing queries: MS MARCO passage and document sets, TREC DL 2019/2020",
             "MS MARCO terms: non-commercial research"),
    "weblog": ("web search-log keyword queries: TREC Million Query 2007-2009, Terabyte 2005 efficiency",
               "TREC topics from NIST"),
}

# (topic file under topics-and-qrels/, parser, encoding, group). Parsers:
#   answers  `text<TAB>answers`; the text may be CSV-quoted twice (TriviaQA, CuratedTREC)
#   json     JSON lines with a "question" member
#   id_tab   `id<TAB>text`
#   id_colon `id:text`
#   id_prio  `id:priority:text` (Million Query 2009)
SOURCES = [
    ("topics.dpr.trivia.test.txt", "answers", "utf-8", "qa"),
    ("topics.dpr.trivia.dev.txt", "answers", "utf-8", "qa"),
    ("topics.dpr.squad.test.txt", "json", "utf-8", "qa"),
    ("topics.dpr.wq.test.txt", "json", "utf-8", "qa"),
    ("topics.dpr.curated.test.txt", "json", "utf-8", "qa"),
    ("topics.nq.dev.txt", "answers", "utf-8", "qa"),
    ("topics.nq.test.txt", "answers", "utf-8", "qa"),
    ("topics.mrtydi-v1.1-en.train.txt.gz", "id_tab", "utf-8", "qa"),
    ("topics.mrtydi-v1.1-en.dev.txt.gz", "id_tab", "utf-8", "qa"),
    ("topics.mrtydi-v1.1-en.test.txt.gz", "id_tab", "utf-8", "qa"),
    ("topics.miracl-v1.0-en-dev.tsv", "id_tab", "utf-8", "qa"),
    ("topics.beir-v1.0.0-hotpotqa.test.tsv.gz", "id_tab", "utf-8", "qa"),
    ("topics.beir-v1.0.0-nq.test.tsv.gz", "id_tab", "utf-8", "qa"),
    ("topics.beir-v1.0.0-fiqa.test.tsv.gz", "id_tab", "utf-8", "qa"),
    ("topics.beir-v1.0.0-bioasq.test.tsv.gz", "id_tab", "utf-8", "qa"),
    ("topics.beir-v1.0.0-trec-covid.test.tsv.gz", "id_tab", "utf-8", "qa"),
    ("topics.beir-v1.0.0-webis-touche2020.test.tsv.gz", "id_tab", "utf-8", "qa"),
    ("topics.beir-v1.0.0-quora.test.tsv.gz", "id_tab", "utf-8", "quora"),
] + [
    (f"topics.beir-v1.0.0-cqadupstack-{site}.test.tsv.gz", "id_tab", "utf-8", "stackexchange")
    for site in ["android", "english", "gaming", "gis", "mathematica", "physics",
                 "programmers", "stats", "tex", "unix", "webmasters", "wordpress"]
] + [
    ("topics.msmarco-passage.dev-subset.txt", "id_tab", "utf-8", "bing"),
    ("topics.msmarco-passage.test-subset.txt", "id_tab", "utf-8", "bing"),
    ("topics.msmarco-doc.dev.txt", "id_tab", "utf-8", "bing"),
    ("topics.msmarco-doc.test.txt", "id_tab", "utf-8", "bing"),
    ("topics.msmarco-v2-passage.dev.txt", "id_tab", "utf-8", "bing"),
    ("topics.msmarco-v2-passage.dev2.txt", "id_tab", "utf-8", "bing"),
    ("topics.msmarco-v2-doc.dev.txt", "id_tab", "utf-8", "bing"),
    ("topics.msmarco-v2-doc.dev2.txt", "id_tab", "utf-8", "bing"),
    ("topics.dl19-passage.txt", "id_tab", "utf-8", "bing"),
    ("topics.dl19-doc.txt", "id_tab", "utf-8", "bing"),
    ("topics.dl20.txt", "id_tab", "utf-8", "bing"),
    ("topics.mq.1-10000.txt", "id_colon", "latin-1", "weblog"),
    ("topics.mq.10001-20000.txt", "id_colon", "latin-1", "weblog"),
    ("topics.mq.20001-60000.txt", "id_prio", "latin-1", "weblog"),
    ("topics.terabyte05.efficiency.txt", "id_colon", "utf-8", "weblog"),
]


# Topic files whose queries may be redistributed (open licences: TriviaQA Apache-2.0,
# SQuAD and HotpotQA CC BY-SA 4.0, WebQuestions CC BY 4.0, NQ CC BY-SA 3.0, Mr.TyDi and
# MIRACL Apache-2.0, StackExchange CC BY-SA, TREC Million Query and Terabyte topics
# published by NIST).
OPEN_SOURCES = {name for name, _, _, group in SOURCES if group in ("stackexchange", "weblog")} | {
    "topics.dpr.trivia.test.txt", "topics.dpr.trivia.dev.txt", "topics.dpr.squad.test.txt",
    "topics.dpr.wq.test.txt", "topics.nq.dev.txt", "topics.nq.test.txt",
    "topics.mrtydi-v1.1-en.train.txt.gz", "topics.mrtydi-v1.1-en.dev.txt.gz",
    "topics.mrtydi-v1.1-en.test.txt.gz", "topics.miracl-v1.0-en-dev.tsv",
    "topics.beir-v1.0.0-hotpotqa.test.tsv.gz",
}


def unquote_csv(text):
    """`"a ""b"" c"` -> `a "b" c`, applied while the text is a quoted CSV field (the
    TriviaQA files quote theirs twice)."""
    for _ in range(2):
        if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
            text = text[1:-1].replace('""', '"')
    return text


def parse_line(line, parser):
    """The query text of one line of a topic file, or None when the line holds none."""
    if parser == "answers":
        return unquote_csv(line.split("\t", 1)[0])
    if parser == "json":
        try:
            question = json.loads(line).get("question")
        except (ValueError, AttributeError):
            return None
        return question if isinstance(question, str) else None
    if parser == "id_tab":
        parts = line.split("\t", 1)
        return parts[1] if len(parts) == 2 else None
    if parser == "id_colon":
        parts = line.split(":", 1)
        return parts[1] if len(parts) == 2 and parts[0].strip().isdigit() else None
    if parser == "id_prio":
        parts = line.split(":", 2)
        return parts[2] if len(parts) == 3 and parts[0].strip().isdigit() else None
    raise ValueError(f"unknown parser {parser!r}")


def clean(text):
    """Whitespace folded to single spaces; None for texts simq does not keep (fewer than
    MIN_WORDS words, longer than MAX_CHARS, control characters)."""
    if text is None:
        return None
    text = " ".join(text.split())
    if len(text.split(" ")) < MIN_WORDS or len(text) > MAX_CHARS:
        return None
    if any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 for c in text):
        return None
    return text


def topic_files(wheel):
    """The anserini jar inside a pyserini wheel, opened as a zip."""
    with zipfile.ZipFile(wheel) as w:
        jars = [n for n in w.namelist() if n.startswith("pyserini/resources/jars/anserini-") and n.endswith("-fatjar.jar")]
        if len(jars) != 1:
            sys.exit(f"{wheel}: expected one pyserini/resources/jars/anserini-*-fatjar.jar, found {jars or 'none'}")
        return zipfile.ZipFile(io.BytesIO(w.read(jars[0])))


def extract(wheel, open_only=False):
    """[(text, source)] of the wheel's topic files, unique after case and whitespace
    folding, in SOURCES order; and {group: (files, lines, kept)}."""
    jar = topic_files(wheel)
    names = set(jar.namelist())
    seen, rows, stats = set(), [], {}
    for name, parser, encoding, group in SOURCES:
        if open_only and name not in OPEN_SOURCES:
            continue
        member = "topics-and-qrels/" + name
        if member not in names:
            sys.exit(f"{wheel}: its jar has no {member} (simq's corpus needs it; see scripts/corpus.py SOURCES)")
        data = jar.read(member)
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        source = name.removeprefix("topics.").removesuffix(".gz").rsplit(".", 1)[0]
        files, lines, kept = stats.get(group, (0, 0, 0))
        files += 1
        for line in data.decode(encoding).splitlines():
            text = clean(parse_line(line, parser))
            if text is None:
                continue
            lines += 1
            key = text.casefold()
            if key in seen:
                continue
            seen.add(key)
            rows.append((text, source))
            kept += 1
        stats[group] = (files, lines, kept)
    return rows, stats


def main(argv):
    if len(argv) < 4:
        sys.exit(__doc__)
    wheel, out = argv[2], argv[3]
    if argv[1] == "test-corpus" and len(argv) == 5:
        rows, stats = extract(wheel, open_only=True)
        rows = random.Random(TEST_CORPUS_SEED).sample(rows, int(argv[4]))
        with open(out, "w", encoding="utf-8", newline="\n") as f:
            for text, _ in rows:
                f.write(f"{text}\n")
    elif argv[1] == "extract" and len(argv) == 4:
        rows, stats = extract(wheel)
        with open(out, "w", encoding="utf-8", newline="\n") as f:
            f.write("text\tsource\n")
            for text, source in rows:
                f.write(f"{text}\t{source}\n")
    else:
        sys.exit(__doc__)
    for group, (files, lines, kept) in stats.items():
        print(f"corpus: {group:<13} {kept:>7} unique queries of {lines:>7} from {files:>2} files ({GROUPS[group][0]})", file=sys.stderr)
    print(f"corpus: {len(rows)} queries in {out}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv)
