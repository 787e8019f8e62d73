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


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def dataset(work, gb):
    """Synthetic NDJSON of at least `gb` GB: 1,000 patients make ~0.1 GB
    here, so patients scale with the target (generated once)."""
    data = os.path.join(work, f"data-{gb}gb")
    marker = os.path.join(data, ".complete")
    if not os.path.exists(marker):
        shutil.rmtree(data, ignore_errors=True)
        patients = 1000
        while True:
            subprocess.run([ATLAS, "--quiet", "synth", "--patients", str(patients), "--seed", "20", "--out", data], check=True)
            size = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
            if size >= gb * 1e9:
                break
            patients = int(patients * gb * 1e9 / max(size, 1) * 1.05) + 1
            shutil.rmtree(data)
        open(marker, "w").write(str(size))
    return data, sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data) if f.endswith(".ndjson"))


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
