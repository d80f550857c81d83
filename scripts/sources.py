#!/usr/bin/env python3
"""Asks each registry whether every artifact simq's set-up pins is still served, without
downloading any: PyPI (simple index, JSON form), the Go module proxy (`@v/VERSION.info`),
crates.io (sparse index: version present, not yanked, same checksum as Cargo.lock) and
Debian's mirror (HEAD of the .deb apt would fetch).

    sources.py check ROOT [PIN...]   every pin of the repo at ROOT, plus PINs; exit 1
                                     naming each artifact that is not served
    sources.py why PIN               one pin: why it cannot be fetched (for error messages)

A PIN is KIND:SPEC, one of
    pypi:NAME==VERSION[@SHA256]   deb:PACKAGE   go:MODULE@VERSION   crate:NAME@VERSION[@CKSUM]
From ROOT it reads Cargo.lock (crates), */build/go.mod and consul/prometheus/build/go.mod
(Go modules: requires and replacement targets) and scripts/bench/requirements.txt; the
PyPI wheels and Debian packages of scripts/setup.sh come as PINs (scripts/setup.sh check
passes them from scripts/lib.sh, their one home).

Each answer is one of: served; NOT SERVED (the registry answered, and the artifact is not
there: a removed version, a yanked crate, other bytes); UNREACHABLE (no answer: network,
proxy, DNS). Only the first two are about the pin; both fail the check.
"""

import concurrent.futures
import http.client
import json
import os
import re
import subprocess
import sys
import threading
import urllib.parse

TIMEOUT = 15
_local = threading.local()


class Unreachable(Exception):
    """The registry did not answer."""


def http_get(url, accept=None, method="GET"):
    """(status, body) over a keep-alive connection per thread and host."""
    u = urllib.parse.urlsplit(url)
    conns = _local.__dict__.setdefault("conns", {})
    key = (u.scheme, u.netloc)
    path = u.path + ("?" + u.query if u.query else "")
    headers = {"User-Agent": "simq-sources-check"}
    if accept:
        headers["Accept"] = accept
    for attempt in range(2):
        conn = conns.get(key)
        if conn is None:
            cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
            conn = conns[key] = cls(u.netloc, timeout=TIMEOUT)
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, body
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            del conns[key]
            if attempt == 1:
                raise Unreachable(f"{u.netloc}: {e}") from e
    raise AssertionError("unreachable")


def canonical_pypi(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def pypi_index():
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def check_pypi(spec):
    """pypi:NAME==VERSION[@SHA256]"""
    sha = None
    if "@" in spec:
        spec, sha = spec.split("@", 1)
    name, version = spec.split("==", 1)
    url = f"{pypi_index()}/{canonical_pypi(name)}/"
    status, body = http_get(url, accept="application/vnd.pypi.simple.v1+json")
    if status == 404:
        return False, f"PyPI ({pypi_index()}) has no project {name}"
    if status != 200:
        raise Unreachable(f"{url}: HTTP {status}")
    index = json.loads(body)
    stem = canonical_pypi(name).replace("-", "_")
    files = []
    for f in index.get("files", []):
        fname = f["filename"]
        m = re.match(r"^(.+?)-(\d[^-]*?)(?:-.*\.whl|\.tar\.gz|\.zip)$", fname)
        if m and canonical_pypi(m.group(1)).replace("-", "_") == stem and m.group(2) == version:
            files.append(f)
    if not files:
        served = index.get("versions") or sorted(
            {m.group(1) for f in index.get("files", []) for m in [re.match(r"^[^-]+-(\d[^-]*?)(?:-|\.tar|\.zip)", f["filename"])] if m})
        return False, f"PyPI serves no {name} {version} (versions served: {', '.join(served[-8:]) or 'none'})"
    live = [f for f in files if not f.get("yanked")]
    if not live:
        return False, f"PyPI has {name} {version} only as yanked files"
    if sha and not any(f.get("hashes", {}).get("sha256") == sha for f in live):
        return False, f"PyPI serves {name} {version}, but no file with sha256 {sha}"
    return True, f"{name} {version}"


def go_proxy():
    proxy = os.environ.get("GOPROXY") or subprocess.run(
        ["go", "env", "GOPROXY"], capture_output=True, text=True).stdout.strip() or "https://proxy.golang.org"
    first = re.split(r"[,|]", proxy)[0]
    return "https://proxy.golang.org" if first in ("direct", "off", "") else first.rstrip("/")


def go_escape(path):
    return re.sub(r"[A-Z]", lambda m: "!" + m.group(0).lower(), path)


def check_go(spec):
    """go:MODULE@VERSION"""
    module, version = spec.rsplit("@", 1)
    url = f"{go_proxy()}/{go_escape(module)}/@v/{go_escape(version)}.info"
    status, body = http_get(url)
    if status == 200:
        return True, f"{module} {version}"
    # 403 is what a filtering proxy in front of the Go proxy answers ("This module
    # version is not available."); 404 and 410 the Go proxy itself.
    if status in (403, 404, 410):
        return False, f"the Go module proxy serves no {module} {version} (HTTP {status}: {body.decode(errors='replace').strip()[:120]})"
    raise Unreachable(f"{url}: HTTP {status}")


def crate_index_path(name):
    n = name.lower()
    if len(n) <= 2:
        return f"{len(n)}/{n}"
    if len(n) == 3:
        return f"3/{n[0]}/{n}"
    return f"{n[:2]}/{n[2:4]}/{n}"


def check_crate(spec):
    """crate:NAME@VERSION[@CKSUM]"""
    parts = spec.split("@")
    name, version = parts[0], parts[1]
    cksum = parts[2] if len(parts) > 2 else None
    url = f"https://index.crates.io/{crate_index_path(name)}"
    status, body = http_get(url)
    if status == 404:
        return False, f"crates.io has no crate {name}"
    if status != 200:
        raise Unreachable(f"{url}: HTTP {status}")
    for line in body.decode().splitlines():
        entry = json.loads(line)
        if entry.get("vers") != version:
            continue
        if cksum and entry.get("cksum") != cksum:
            return False, f"crates.io serves {name} {version} with checksum {entry.get('cksum')}, Cargo.lock pins {cksum}"
        if entry.get("yanked"):
            return True, f"{name} {version} (yanked: still served to Cargo.lock, but not to new resolutions)"
        return True, f"{name} {version}"
    return False, f"crates.io serves no {name} {version}"


def check_deb(package):
    """deb:PACKAGE: apt's candidate .deb still on the mirror."""
    out = subprocess.run(["apt-get", "download", "--print-uris", "-qq", package],
                         capture_output=True, text=True)
    if out.returncode != 0:
        msg = (out.stderr.strip().splitlines() or ["no message"])[-1]
        if "Unable to locate package" in msg or "has no installation candidate" in msg:
            return False, f"Debian (apt's lists) has no package {package}: {msg}"
        raise Unreachable(f"apt-get download --print-uris {package}: {msg}")
    uri = out.stdout.split()[0].strip("'")
    status, _ = http_get(uri, method="HEAD")
    if status == 200:
        return True, f"{package} ({uri.rsplit('/', 1)[-1]})"
    if status in (404, 410):
        return False, f"the Debian mirror no longer serves {uri} (apt-get update, then check again)"
    raise Unreachable(f"{uri}: HTTP {status}")


CHECKS = {"pypi": check_pypi, "go": check_go, "crate": check_crate, "deb": check_deb}


def check(pin):
    """(pin, "served" | "NOT SERVED" | "UNREACHABLE", message)"""
    kind, _, spec = pin.partition(":")
    if kind not in CHECKS or not spec:
        return pin, "NOT SERVED", f"not a pin (KIND:SPEC with KIND one of {', '.join(CHECKS)})"
    try:
        ok, msg = CHECKS[kind](spec)
        return pin, "served" if ok else "NOT SERVED", msg
    except Unreachable as e:
        return pin, "UNREACHABLE", f"no answer from the registry: {e}"
    except (ValueError, IndexError, KeyError) as e:
        return pin, "NOT SERVED", f"unexpected answer: {e!r}"


def repo_pins(root):
    pins = []
    lock = open(os.path.join(root, "Cargo.lock"), encoding="utf-8").read()
    for block in lock.split("[[package]]")[1:]:
        fields = dict(re.findall(r'^(\w+) = "([^"]*)"', block, re.M))
        if fields.get("source", "").startswith("registry+https://github.com/rust-lang/crates.io-index"):
            pins.append(f"crate:{fields['name']}@{fields['version']}@{fields.get('checksum', '')}".rstrip("@"))
    for gomod in ["consul/build/go.mod", "nomad/build/go.mod", "consul/prometheus/build/go.mod", "seaweedfs/build/go.mod"]:
        text = open(os.path.join(root, gomod), encoding="utf-8").read()
        text = re.sub(r"//.*", "", text)
        for module, version in re.findall(r"^\s*(?:require\s+)?([a-zA-Z0-9.\-_~/]+\.[a-z]+/\S+)\s+(v\S+)\s*$", text, re.M):
            pins.append(f"go:{module}@{version}")
        for module, version in re.findall(r"=>\s*(\S+)\s+(v\S+)", text):
            pins.append(f"go:{module}@{version}")
    for line in open(os.path.join(root, "scripts/bench/requirements.txt"), encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if line:
            pins.append(f"pypi:{line}")
    return sorted(set(pins))


def main(argv):
    if len(argv) >= 3 and argv[1] == "check":
        pins = repo_pins(argv[2]) + argv[3:]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(check, pins))
        bad = [r for r in results if r[1] != "served"]
        counts = {}
        for pin, state, _ in results:
            counts.setdefault(pin.split(":")[0], [0, 0])[state == "served"] += 1
        summary = ", ".join(f"{kind} {ok}/{ok + nok}" for kind, (nok, ok) in sorted(counts.items()))
        for pin, state, msg in bad:
            print(f"{state}: {pin}: {msg}")
        print(f"sources: {len(results) - len(bad)} of {len(results)} pinned artifacts served ({summary})")
        return 1 if bad else 0
    if len(argv) == 3 and argv[1] == "why":
        _, state, msg = check(argv[2])
        print(f"{state}: {msg}")
        return 0 if state == "served" else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
