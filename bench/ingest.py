#!/usr/bin/env python3
"""Ingest benchmark (not a test).

Ingests a dataset (default: the 615-patient SMART NDJSON in ../shared) and a
`atlas synth scale` copy of it, and prints MB/s, resources/s and peak RSS next
to the floor on the same bytes in the same run: read + gunzip + split + parse
every line with serde_json on all cores, discarding the result
(crates/atlas-ingest/examples/parse_floor.rs).

usage: bench/ingest.py [dataset-dir] [--factor 10] [--repeat 3] [--no-build]
MB are of uncompressed JSON, the same bytes for ingest and floor.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
ATLAS = os.path.join(TARGET, "release", "atlas")
FLOOR = os.path.join(TARGET, "release", "examples", "parse_floor")


def rss_of(cmd):
    """Peak RSS of one command, measured with wait4 (exact per child)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t
    if status != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err.decode()}")
    return secs, usage.ru_maxrss / 1024, out.decode(), err.decode()


def bench(label, data, work, repeat):
    """Floor and ingest alternate `repeat` times, so both see the same host
    conditions (shared machines drift by 30% within minutes); the figures
    are medians and the ratio is of the medians."""
    floors, ingests, rsss, pairs = [], [], [], []
    for _ in range(repeat):
        _, _, floor_out, _ = rss_of([FLOOR, data])
        floor = json.loads(floor_out)
        lake = os.path.join(work, "lake-" + label)
        shutil.rmtree(lake, ignore_errors=True)
        secs, rss, out, _ = rss_of([ATLAS, "--quiet", "--lake", lake, "ingest", "--json", data])
        report = json.loads(out)
        floors.append(floor["seconds"])
        ingests.append(secs)
        rsss.append(rss)
        pairs.append(round(floor["seconds"] / secs, 3))
    floor_s = statistics.median(floors)
    secs = statistics.median(ingests)
    mb = floor["bytes"] / 1e6
    lines = report["outcomes"]["lines_read"]
    row = {
        "dataset": label,
        "uncompressed_mb": round(mb, 1),
        "resources": lines,
        "runs": repeat,
        "ingest_s": round(secs, 2),
        "ingest_mb_s": round(mb / secs, 1),
        "ingest_resources_s": round(lines / secs),
        "ingest_peak_rss_mib": round(max(rsss)),
        "floor_s": round(floor_s, 2),
        "floor_mb_s": round(mb / floor_s, 1),
        "ingest_vs_floor": round(floor_s / secs, 3),
        "ingest_vs_floor_each_run": pairs,
    }
    print(json.dumps(row))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=os.path.join(ROOT, "..", "shared", "data", "fhir", "large",
                                                          "smart-generated-sample-data-R4", "ndjson"))
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="floor/ingest pairs per dataset (medians reported)")
    a = ap.parse_args()
    if not os.path.isdir(a.data):
        sys.exit(f"MISSING: {a.data} (the benchmark needs ../shared or a dataset folder)")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "atlas-cli"], check=True, cwd=ROOT)
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "atlas-ingest", "--example", "parse_floor"],
                       check=True, cwd=ROOT)
    work = tempfile.mkdtemp(prefix="atlas-bench-", dir="/var/tmp")
    try:
        print(f"# atlas ingest vs parse floor, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
        bench("base", a.data, work, a.repeat)
        if a.factor > 1:
            scaled = os.path.join(work, f"x{a.factor}")
            subprocess.run([ATLAS, "--quiet", "synth", "scale", "--factor", str(a.factor), a.data, "--out", scaled],
                           check=True)
            bench(f"x{a.factor}", scaled, work, a.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
