#!/usr/bin/env python3
"""Unique cache-miss queries for benchmarks: corpus questions with a perturbation each
(a typo, a dropped word, or two words swapped), chosen with a fixed seed.

    queries.py CORPUS --n 100000 --seed 7 > queries.txt

No output line repeats, and none equals a corpus line, so every query misses the answer
cache and is a realistic near-duplicate of something indexed."""
import argparse
import random
import sys


def typo(words, rng):
    i = rng.randrange(len(words))
    w = words[i]
    if len(w) > 3:
        j = rng.randrange(len(w) - 1)
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    else:
        words[i] = w + rng.choice("aeiou")
    return words


def drop(words, rng):
    if len(words) > 3:
        del words[rng.randrange(len(words))]
    return words


def swap(words, rng):
    if len(words) > 2:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    return words


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus")
    p.add_argument("--n", type=int, default=100000)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    rng = random.Random(a.seed)
    corpus = [l.strip() for l in open(a.corpus, encoding="utf-8") if l.strip()]
    known = set(corpus)
    seen = set()
    out = sys.stdout
    tries = 0
    while len(seen) < a.n and tries < a.n * 20:
        tries += 1
        words = rng.choice(corpus).split()
        if len(words) < 3:
            continue
        words = rng.choice((typo, drop, swap))(words, rng)
        q = " ".join(words)
        # The API refuses a query over 1,000 characters (a 400, not a search): a typo can
        # push a corpus text at the limit past it.
        if q in known or q in seen or len(q) > 1000:
            continue
        seen.add(q)
        out.write(q + "\n")
    if len(seen) < a.n:
        sys.exit(f"only {len(seen)} unique queries from {a.corpus}")


if __name__ == "__main__":
    main()
