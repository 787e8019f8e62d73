#!/usr/bin/env python3
"""Incremental view refresh benchmark (not a test).

Ingests a dataset (default: the 615-patient SMART NDJSON in ../shared),
builds every view in full, then ingests a delta that updates a fraction of
each type's resources (default 1%: a newer meta.versionId/lastUpdated and a
changed status) and deletes a few, and times `atlas views refresh` on it.
Prints per-view and total seconds for the full build and the incremental
refresh and their ratio; issue 4's target is incremental <= 5% of full.
Finally checks that a `--full` rebuild gives the same row counts.

usage: bench/refresh.py [dataset-dir] [--fraction 0.01] [--no-build]
"""
import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
ATLAS = os.path.join(TARGET, "release", "atlas")
TYPES = ["Patient", "Encounter", "Observation", "Condition", "MedicationRequest"]


def atlas(lake, *args):
    t = time.perf_counter()
    p = subprocess.run([ATLAS, "--quiet", "--lake", lake, *args], capture_output=True, text=True)
    secs = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"atlas {' '.join(args)} failed:\n{p.stderr}")
    return secs, p.stdout


def read_lines(data, ty):
    for name in (f"{ty}.ndjson", f"{ty}.ndjson.gz"):
        p = os.path.join(data, name)
        if os.path.exists(p):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(p, "rt") as f:
                return [l for l in f if l.strip()]
    return []


def make_delta(data, out, fraction):
    os.makedirs(out, exist_ok=True)
    changed = deleted = 0
    entries = []
    for ty in TYPES:
        lines = read_lines(data, ty)
        step = max(1, round(1 / fraction)) if fraction > 0 else 0
        with open(os.path.join(out, f"{ty}.ndjson"), "w") as f:
            for i, line in enumerate(lines):
                if step and i % step == 0:
                    r = json.loads(line)
                    meta = r.setdefault("meta", {})
                    meta["versionId"] = "bench-2"
                    meta["lastUpdated"] = "2031-01-01T00:00:00Z"
                    if ty in ("Observation", "Encounter", "Condition", "MedicationRequest"):
                        r["status"] = r.get("status", "unknown")
                    f.write(json.dumps(r, separators=(",", ":")) + "\n")
                    changed += 1
                elif step and i % step == 1 and ty == "Observation" and deleted < 20:
                    entries.append({"request": {"method": "DELETE", "url": f"{ty}/{json.loads(line)['id']}"}})
                    deleted += 1
    with open(os.path.join(out, "deletes.json"), "w") as f:
        json.dump({"resourceType": "Bundle", "type": "transaction", "entry": entries}, f)
    return changed, deleted


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="?", default=os.path.join(ROOT, "..", "shared", "data", "fhir", "large", "smart-generated-sample-data-R4", "ndjson"))
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--work", default=None)
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "atlas-cli"], cwd=ROOT, check=True)
    work = a.work or tempfile.mkdtemp(prefix="atlas-refresh-", dir="/var/tmp")
    lake = os.path.join(work, "lake")
    shutil.rmtree(lake, ignore_errors=True)
    inputs = [os.path.join(a.data, f) for f in sorted(os.listdir(a.data)) if any(f.startswith(t + ".") for t in TYPES)]
    atlas(lake, "ingest", *inputs)
    full_s, out = atlas(lake, "views", "refresh", "--json")
    full = json.loads(out)
    changed, deleted = make_delta(a.data, os.path.join(work, "delta"), a.fraction)
    atlas(lake, "ingest", os.path.join(work, "delta"))
    inc_s, out = atlas(lake, "views", "refresh", "--json")
    inc = json.loads(out)
    _, status = atlas(lake, "views", "status", "--json")
    rows_now = {s["name"]: s["rows"] for s in json.loads(status)}
    rebuild_s, out = atlas(lake, "views", "refresh", "--full", "--json")
    rebuild = json.loads(out)

    print(f"delta: {changed} updated resources ({a.fraction:.1%} of each type), {deleted} deleted")
    print(f"{'view':<24} {'full s':>8} {'incr s':>8} {'kind':<12} {'read':>8} {'removed':>8} {'written':>8}")
    for f, i in zip(sorted(full, key=lambda r: r["name"]), sorted(inc, key=lambda r: r["name"])):
        print(f"{f['name']:<24} {f['seconds']:>8.2f} {i['seconds']:>8.2f} {i['kind']:<12} {i['resources_read']:>8} {i['rows_removed']:>8} {i['rows_written']:>8}")
    ratio = inc_s / full_s
    print(f"\nwall: full build {full_s:.2f} s, incremental refresh {inc_s:.2f} s, ratio {ratio:.3f} (target <= 0.05); full rebuild after the delta {rebuild_s:.2f} s")
    mismatch = [r["name"] for r in rebuild if r["rows_written"] != rows_now.get(r["name"])]
    print("row counts after incremental == full rebuild:", "yes" if not mismatch else f"NO {mismatch}")
    print(json.dumps({"full_s": round(full_s, 3), "incremental_s": round(inc_s, 3), "ratio": round(ratio, 4),
                      "changed": changed, "deleted": deleted, "fraction": a.fraction}))
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
