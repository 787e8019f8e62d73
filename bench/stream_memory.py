#!/usr/bin/env python3
"""Streaming benchmark (not a test): memory of `atlas serve` while it
streams a whole large set, and time to first byte.

Starts `atlas serve --dev-auth` on an existing lake (build one with
`bench/serve.py --factor 115 --prepare-only --work DIR`: about 10 million
observations), then streams, one after the other, to a client that reads as
fast as it can:

  1. loadObjects, Observation, format=ndjson (every object, no orderBy);
  2. the same as an Arrow IPC stream (format=arrow);
  3. FHIR search /fhir/Observation?_format=ndjson (stored JSON, no _sort);
  4. /api/v2/views/observation/rows?format=parquet.

Each stream gets a fresh server. While it runs, the server's resident memory (VmRSS from /proc) is sampled
every 50 ms. Printed per stream: rows (lines, or batches' rows), bytes,
seconds, MB/s, time to first byte, and RSS before / peak / at the end, plus
the peak over the first and the last tenth of the stream: equal peaks mean
memory does not grow with rows streamed.

usage: bench/stream_memory.py --lake DIR [--atlas target/release/atlas] [--only "FHIR"]
"""
import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

from serve import free_port, wait_for  # bench/serve.py, next to this file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stream(port, token, method, path, body, pid):
    samples = []  # (seconds since start, bytes so far, rss MB)
    state = {"bytes": 0, "done": False}
    t0 = time.perf_counter()

    def sampler():
        while not state["done"]:
            samples.append((time.perf_counter() - t0, state["bytes"], rss_mb(pid)))
            time.sleep(0.05)

    before = rss_mb(pid)
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
    r = conn.getresponse()
    if r.status != 200:
        state["done"] = True
        sys.exit(f"{path}: HTTP {r.status}: {r.read()[:500]!r}")
    first = None
    lines = 0
    while True:
        chunk = r.read1(1 << 20)
        if not chunk:
            break
        if first is None:
            first = time.perf_counter() - t0
        state["bytes"] += len(chunk)
        lines += chunk.count(b"\n")
    secs = time.perf_counter() - t0
    state["done"] = True
    th.join()
    total = state["bytes"]
    head = [s[2] for s in samples if s[1] <= total * 0.1] or [before]
    tail = [s[2] for s in samples if s[1] >= total * 0.9] or [rss_mb(pid)]
    deciles = [max([s[2] for s in samples if total * i / 10 <= s[1] <= total * (i + 1) / 10] or [0])
                for i in range(10)]
    return {
        "rss_peak_by_tenth": [round(d) for d in deciles],
        "bytes": total,
        "lines": lines,
        "seconds": secs,
        "ttfb_ms": (first or secs) * 1000,
        "rss_before": before,
        "rss_peak": max([s[2] for s in samples] + [before]),
        "rss_peak_first_tenth": max(head),
        "rss_peak_last_tenth": max(tail),
        "rss_end": rss_mb(pid),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lake", required=True)
    ap.add_argument("--atlas", default=os.path.join(TARGET, "release", "atlas"))
    ap.add_argument("--only", help="run only the streams whose name contains this text")
    a = ap.parse_args()
    if not os.path.isdir(os.path.join(a.lake, "views", "observation")):
        sys.exit(f"{a.lake}: no observation view (build the lake with bench/serve.py --prepare-only)")
    token = subprocess.run([a.atlas, "--quiet", "--lake", a.lake, "token", "--sub", "bench",
                            "--scope", "user/*.rs", "--ttl", "1d"], capture_output=True, text=True,
                           check=True).stdout.strip()
    load = "/api/v2/ontologies/atlas/objectSets/loadObjects"
    base = {"objectSet": {"type": "base", "objectType": "Observation"}}
    runs = [
        ("loadObjects NDJSON", "POST", f"{load}?format=ndjson", base),
        ("loadObjects Arrow IPC", "POST", f"{load}?format=arrow", base),
        ("FHIR search NDJSON", "GET", "/fhir/Observation?_format=ndjson", None),
        ("view rows Parquet", "GET", "/api/v2/views/observation/rows?format=parquet", None),
    ]
    results = []
    # A fresh server per stream, so each starts from the same memory.
    for name, method, path, body in runs:
        if a.only and a.only.lower() not in name.lower():
            continue
        port = free_port()
        server = subprocess.Popen([a.atlas, "--quiet", "--lake", a.lake, "serve", "--dev-auth",
                                   "--bind", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env={**os.environ, "ATLAS_LOG": "warn"})
        try:
            wait_for(port)
            r = stream(port, token, method, path, body, server.pid)
            r["name"] = name
            print(json.dumps(r), flush=True)
            results.append(r)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    print()
    print("| stream | lines | MB | s | MB/s | first byte ms | RSS before MB | RSS peak MB | peak, first 10% | peak, last 10% | tenths' peaks, min–max |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        lines = f"{r['lines']:,}" if "NDJSON" in r["name"] else "–"
        print(f"| {r['name']} | {lines} | {r['bytes'] / 1e6:,.0f} | {r['seconds']:.1f} | "
              f"{r['bytes'] / 1e6 / r['seconds']:.0f} | {r['ttfb_ms']:.0f} | {r['rss_before']:.0f} | "
              f"{r['rss_peak']:.0f} | {r['rss_peak_first_tenth']:.0f} | {r['rss_peak_last_tenth']:.0f} | "
              f"{min(r['rss_peak_by_tenth'])}–{max(r['rss_peak_by_tenth'])} |")


if __name__ == "__main__":
    main()
