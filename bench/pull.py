#!/usr/bin/env python3
"""Pull benchmark (not a test): `atlas mock-ehr` -> `atlas pull bulk` ->
land -> ingest, next to a plain `atlas ingest` of the same files, in the
same run, alternating, on loopback.

The data: `atlas synth` NDJSON of at least --gb gigabytes (generated once
into --work and reused). The mock serves it as a Bulk Data export with
SMART Backend Services auth (an ES384 client key made by `atlas pull
keygen`). Each round ingests the files into a fresh lake, then pulls the
export into another fresh lake; the figures are medians.

Prints per command: seconds, MB/s of NDJSON end to end, peak RSS (of the
atlas process; the mock's is printed separately), and pull/ingest.

usage: bench/pull.py [--gb 2] [--repeat 2] [--work /var/tmp/atlas-bench-pull]
                     [--gzip] [--no-build]
Target (issue 20): pull within 1.5x of plain ingest. bulk_fhir_tools'
published figure: 23 GB in 1 h 47 min (about 3.6 MB/s).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

from ingest import ATLAS, ROOT, rss_of  # bench/ingest.py, next to this file
from serve import free_port  # bench/serve.py


SMART = os.path.join(ROOT, "..", "shared", "data", "fhir", "large", "smart-generated-sample-data-R4", "ndjson")


def ndjson_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".ndjson"))


def dataset(work, gb):
    """Plain NDJSON of at least `gb` GB (made once, reused): the SMART
    sample in ../shared (261 MB) scaled with `atlas synth scale`, or, when
    ../shared is missing, `atlas synth` patients. Plain, not gzip, so the
    plain ingest reads the same kind of bytes the pull stages."""
    data = os.path.join(work, f"data-{gb}gb")
    if os.path.exists(os.path.join(data, ".complete")):
        return data, ndjson_bytes(data)
    shutil.rmtree(data, ignore_errors=True)
    if os.path.isdir(SMART):
        factor = max(1, -(-int(gb * 1e9) // 260_000_000))
        scaled = data + ".gz"
        shutil.rmtree(scaled, ignore_errors=True)
        subprocess.run([ATLAS, "--quiet", "synth", "scale", "--factor", str(factor), SMART, "--out", scaled], check=True)
        os.makedirs(data)
        for f in sorted(os.listdir(scaled)):
            src = os.path.join(scaled, f)
            name = f[:-3] if f.endswith(".gz") else f
            if not name.endswith(".ndjson"):
                continue
            with open(os.path.join(data, name), "wb") as out:
                subprocess.run(["gzip", "-dc", src] if f.endswith(".gz") else ["cat", src], stdout=out, check=True)
        shutil.rmtree(scaled)
    else:
        patients = int(gb * 1e9 / 6_600) + 1  # ~6.6 KB of NDJSON per synth patient
        subprocess.run([ATLAS, "--quiet", "synth", "--patients", str(patients), "--seed", "20", "--out", data], check=True)
    open(os.path.join(data, ".complete"), "w").write("ok")
    return data, ndjson_bytes(data)


def start_mock(data, work):
    key = os.path.join(work, "bench-client")
    if not os.path.exists(key + ".pem"):
        subprocess.run([ATLAS, "--quiet", "pull", "keygen", "--alg", "ES384", "--out", key], check=True)
    port = free_port()
    log = open(os.path.join(work, "mock.log"), "w")
    mock = subprocess.Popen([ATLAS, "--quiet", "mock-ehr", "--data", data, "--listen", f"127.0.0.1:{port}",
                             "--client-id", "bench", "--client-jwks", key + ".jwks.json"], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}/fhir"
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return mock, base, key + ".pem"
        except OSError:
            if mock.poll() is not None:
                sys.exit(f"mock-ehr exited: see {log.name}")
            time.sleep(0.5)
    sys.exit("mock-ehr did not start")


def mock_rss(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", default="/var/tmp/atlas-bench-pull")
    ap.add_argument("--gzip", action="store_true", help="ask the mock for gzip (CPU on both ends)")
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "atlas-cli"], cwd=ROOT, check=True)
    os.makedirs(a.work, exist_ok=True)
    data, nbytes = dataset(a.work, a.gb)
    mb = nbytes / 1e6
    mock, base, key = start_mock(data, a.work)
    rows = {"ingest": [], "pull": []}
    try:
        for r in range(a.repeat):
            lake = os.path.join(a.work, "lake-ingest")
            shutil.rmtree(lake, ignore_errors=True)
            secs, rss, out, _ = rss_of([ATLAS, "--quiet", "--lake", lake, "ingest", "--json", data])
            lines = json.loads(out)["outcomes"]["lines_read"]
            rows["ingest"].append((secs, rss, lines))
            lake = os.path.join(a.work, "lake-pull")
            shutil.rmtree(lake, ignore_errors=True)
            cmd = [ATLAS, "--quiet", "--lake", lake, "pull", "bulk", base, "--client-id", "bench", "--key", key,
                   "--work-dir", os.path.join(a.work, "staging"), "--json"]
            if not a.gzip:
                cmd.append("--no-gzip")
            secs, rss, out, _ = rss_of(cmd)
            pulled = json.loads(out)["outcomes"]["lines_read"]
            rows["pull"].append((secs, rss, pulled))
            print(json.dumps({"round": r + 1, "ingest_s": round(rows["ingest"][-1][0], 1), "pull_s": round(secs, 1),
                              "ingest_lines": lines, "pull_lines": pulled}), flush=True)
    finally:
        peak = mock_rss(mock.pid)
        mock.send_signal(signal.SIGINT)
        try:
            mock.wait(timeout=30)
        except subprocess.TimeoutExpired:
            mock.kill()
    out = {"uncompressed_mb": round(mb, 1), "rounds": a.repeat, "gzip": a.gzip, "mock_peak_rss_mib": round(peak)}
    for k, v in rows.items():
        secs = statistics.median(x[0] for x in v)
        out[f"{k}_s"] = round(secs, 1)
        out[f"{k}_mb_s"] = round(mb / secs, 1)
        out[f"{k}_peak_rss_mib"] = round(max(x[1] for x in v))
        out[f"{k}_resources"] = v[-1][2]
    out["pull_vs_ingest"] = round(out["pull_s"] / out["ingest_s"], 2)
    out["bulk_fhir_tools_mb_s"] = round(23e3 / (107 * 60), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
