#!/usr/bin/env python3
"""De-identification benchmark (not a test).

On the same data in the same run (default: the 615-patient SMART NDJSON in
../shared), alternating `--repeat` times so all three see the same host
conditions:

  ingest        atlas ingest                                 (plain ingest, the reference)
  deid          atlas deid --profile safe-harbor-minimal     (de-identified NDJSON out)
  ingest+deid   atlas ingest --deid safe-harbor-minimal      (a de-identified zone)

Prints, per command, the median seconds, MB/s of uncompressed input JSON,
resources/s and peak RSS, and the ratio of each to plain ingest.

usage: bench/deid.py [dataset-dir] [--repeat 3] [--no-build]
"""
import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from ingest import ATLAS, ROOT, rss_of as run  # bench/ingest.py, next to this file

# The profile's secret, for the child processes.
os.environ["ATLAS_DEID_KEY"] = "bench-deid-key"


def input_size(data):
    """Uncompressed bytes and lines of every NDJSON file in `data`."""
    total, lines = 0, 0
    for name in sorted(os.listdir(data)):
        path = os.path.join(data, name)
        opener = gzip.open if name.endswith(".gz") else open
        if not (name.endswith(".ndjson") or name.endswith(".ndjson.gz")):
            continue
        with opener(path, "rb") as f:
            for line in f:
                total += len(line)
                lines += 1 if line.strip() else 0
    return total, lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=os.path.join(ROOT, "..", "shared", "data", "fhir", "large",
                                                          "smart-generated-sample-data-R4", "ndjson"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not os.path.isdir(a.data):
        sys.exit(f"MISSING: {a.data} (the benchmark needs ../shared or a dataset folder)")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "atlas-cli"], check=True, cwd=ROOT)
    size, lines = input_size(a.data)
    mb = size / 1e6
    print(f"# {a.data}: {mb:.1f} MB uncompressed, {lines} resources, {os.cpu_count()} cores", flush=True)
    work = tempfile.mkdtemp(prefix="atlas-bench-deid-")
    commands = {
        "ingest": lambda: [ATLAS, "--quiet", "--lake", os.path.join(work, "lake"), "ingest", a.data],
        "deid": lambda: [ATLAS, "--quiet", "deid", "--profile", "safe-harbor-minimal",
                         "--out", os.path.join(work, "deid"), a.data],
        "ingest+deid": lambda: [ATLAS, "--quiet", "--lake", os.path.join(work, "zone"), "ingest",
                                "--deid", "safe-harbor-minimal", a.data],
    }
    times = {k: [] for k in commands}
    rss = {k: [] for k in commands}
    try:
        for _ in range(a.repeat):
            for name, cmd in commands.items():
                for d in ("lake", "deid", "zone"):
                    shutil.rmtree(os.path.join(work, d), ignore_errors=True)
                secs, peak, _, _ = run(cmd())
                times[name].append(secs)
                rss[name].append(peak)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["ingest"])
    for name in commands:
        s = statistics.median(times[name])
        print(json.dumps({
            "command": name,
            "runs": a.repeat,
            "seconds": round(s, 2),
            "mb_s": round(mb / s, 1),
            "resources_s": round(lines / s),
            "peak_rss_mib": round(max(rss[name])),
            "vs_plain_ingest": round(base / s, 3),
            "each_run_s": [round(t, 2) for t in times[name]],
        }), flush=True)


if __name__ == "__main__":
    main()
