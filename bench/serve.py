#!/usr/bin/env python3
"""Serving latency benchmark (not a test): `atlas serve` under wrk, next to
DuckDB answering the same query over the same Parquet files.

Builds (once, cached in --work) a lake from an `atlas synth scale` copy of
the 615-patient SMART data (Patient, Encounter, Observation, Condition,
MedicationRequest, Medication) at --factor (default 50, about 4 million
observations), ingests it and builds the views. Then starts
`atlas serve --dev-auth`, mints a token with `atlas token`, and measures:

  A. one patient's observations in a date range, ordered by time, 250 per
     page (loadObjects with patientId/dateFrom/dateTo), 1 connection;
  B. GraphQL patient(id) { medicationRequests {...} conditions {...} },
     1 connection;
  C. A with 200 concurrent connections for --soak seconds: errors and p99.

Each request picks a random patient from 500 with observations. DuckDB
(the Python package from .venv-bench) runs A's query over the view
table's Parquet files with a prepared statement, in process (no HTTP), for
the same patients; the script prints p50/p99 for both and the ratio.

usage: bench/serve.py [data-dir] [--factor 50] [--work DIR] [--no-build]
                      [--duration 20] [--soak 60]
"""
import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
TYPES = ["Patient", "Encounter", "Observation", "Condition", "MedicationRequest", "Medication"]
DATE_FROM, DATE_TO = "2010", "2019-12-31"


def run(cmd, **kw):
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return p.stdout


def prepare(atlas, data, factor, work):
    lake = os.path.join(work, "lake")
    done = os.path.join(work, "lake.done")
    if os.path.exists(done):
        return lake
    src = os.path.join(work, "src")
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    for t in TYPES:
        for name in (f"{t}.ndjson", f"{t}.ndjson.gz"):
            p = os.path.join(data, name)
            if os.path.exists(p):
                os.symlink(os.path.abspath(p), os.path.join(src, name))
    scaled = os.path.join(work, f"x{factor}")
    shutil.rmtree(scaled, ignore_errors=True)
    shutil.rmtree(lake, ignore_errors=True)
    t = time.perf_counter()
    run([atlas, "--quiet", "synth", "scale", "--factor", str(factor), src, "--out", scaled])
    print(f"scaled x{factor} in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    run([atlas, "--quiet", "--lake", lake, "ingest", scaled])
    print(f"ingested in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    run([atlas, "--quiet", "--lake", lake, "views", "refresh"])
    print(f"views built in {time.perf_counter() - t:.0f} s", flush=True)
    shutil.rmtree(scaled, ignore_errors=True)
    open(done, "w").close()
    return lake


def sql_column(atlas, lake, q):
    out = run([atlas, "--quiet", "--lake", lake, "sql", "--format", "csv", q])
    return [l for l in out.splitlines()[1:] if l]


def wait_for(port):
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"the server did not listen on port {port}")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


WRK_LUA = r"""
local ids = {IDS}
local token = "{TOKEN}"
local kind = "{KIND}"
math.randomseed(7)
request = function()
  local id = ids[math.random(#ids)]
  local headers = {["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json"}
  if kind == "objects" then
    local body = '{"objectSet":{"type":"base","objectType":"Observation"},"orderBy":{"orderType":"fields","fields":[{"field":"effective"}]},"pageSize":250}'
    return wrk.format("POST", "/api/v2/ontologies/atlas/objectSets/loadObjects?patientId=" .. id .. "&dateFrom={FROM}&dateTo={TO}", headers, body)
  else
    local q = '{"query":"query($id: String!) { patient(id: $id) { id medicationRequests { id status medication_code medication_display authored_on } conditions { id code code_display onset clinical_status } } }","variables":{"id":"' .. id .. '"}}'
    return wrk.format("POST", "/graphql", headers, q)
  end
end
"""


def unit_ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    x = float(m.group(1))
    return {"us": x / 1000, "ms": x, "s": x * 1000}[m.group(2)]


def wrk(port, lua_path, connections, seconds):
    out = run(["wrk", "-t", "2" if connections > 1 else "1", "-c", str(connections), "-d", f"{seconds}s",
               "--latency", "-s", lua_path, f"http://127.0.0.1:{port}"])
    pct = {m.group(1): unit_ms(m.group(2)) for m in re.finditer(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    sock = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", out)) if "Socket errors" in out else 0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return {"p50": pct["50"], "p90": pct["90"], "p99": pct["99"], "requests": reqs, "errors": non2xx + sock, "rps": rps}


def live_files(table):
    """The data files of the Delta table's latest version, from its JSON
    log (the folder also holds files earlier versions replaced)."""
    log = os.path.join(table, "_delta_log")
    commits = sorted(f for f in os.listdir(log) if re.fullmatch(r"\d{20}\.json", f))
    if not commits or int(commits[0][:20]) != 0:
        sys.exit(f"{log}: the JSON log does not start at version 0 (checkpointed); rebuild the bench lake")
    live = set()
    for c in commits:
        with open(os.path.join(log, c)) as f:
            for line in f:
                a = json.loads(line)
                if "add" in a:
                    live.add(urllib.parse.unquote(a["add"]["path"]))
                elif "remove" in a:
                    live.discard(urllib.parse.unquote(a["remove"]["path"]))
    return sorted(os.path.join(table, p) for p in live)


def duckdb_latency(lake, ids, n):
    py = os.path.join(ROOT, ".venv-bench", "bin", "python")
    code = f"""
import duckdb, json, statistics, time, random
files = {live_files(os.path.join(lake, 'views', 'observation'))!r}
con = duckdb.connect()
con.execute("CREATE VIEW obs AS SELECT * FROM read_parquet([" + ", ".join("'" + f + "'" for f in files) + "])")
q = "SELECT * FROM obs WHERE patient_id = ? AND effective >= ? AND left(effective, 10) <= ? ORDER BY effective, id LIMIT 251"
ids = {json.dumps(ids)}
random.seed(7)
for i in ids[:20]:
    con.execute(q, [i, {DATE_FROM!r}, {DATE_TO!r}]).fetchall()
t = []
for _ in range({n}):
    i = random.choice(ids)
    s = time.perf_counter()
    con.execute(q, [i, {DATE_FROM!r}, {DATE_TO!r}]).fetchall()
    t.append((time.perf_counter() - s) * 1000)
t.sort()
print(json.dumps({{"p50": t[len(t)//2], "p99": t[int(len(t)*0.99)], "n": len(t)}}))
"""
    if not os.path.exists(py):
        return None
    return json.loads(run([py, "-c", code]))


def measure_a(a, lake, ids, token, config, policy):
    """Query A on a fresh server with `config` (TOML text) and, when given,
    a policy file with `policy` (TOML text)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = os.path.join(tmp, "atlas.toml")
        with open(conf, "w") as f:
            f.write(config)
            if policy is not None:
                pfile = os.path.join(tmp, "policy.toml")
                with open(pfile, "w") as p:
                    p.write(policy)
                f.write(f"[policy]\nfile = \"{pfile}\"\n")
        server = subprocess.Popen([a.atlas, "--quiet", "--lake", lake, "serve", "--dev-auth", "--config", conf,
                                   "--bind", f"127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "ATLAS_LOG": "warn"})
        try:
            wait_for(port)
            lua = os.path.join(tmp, "objects.lua")
            with open(lua, "w") as f:
                f.write(WRK_LUA.replace("{IDS}", "{" + ",".join(f'"{i}"' for i in ids) + "}")
                        .replace("{TOKEN}", token).replace("{KIND}", "objects")
                        .replace("{FROM}", DATE_FROM).replace("{TO}", DATE_TO))
            wrk(port, lua, 1, 3)
            return wrk(port, lua, 1, a.duration)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=os.path.join(ROOT, "..", "shared", "data", "fhir", "large", "smart-generated-sample-data-R4", "ndjson"))
    ap.add_argument("--factor", type=int, default=50)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "atlas-bench-serve"))
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--atlas", default=os.path.join(TARGET, "release", "atlas"))
    ap.add_argument("--duration", type=int, default=20)
    ap.add_argument("--soak", type=int, default=60)
    ap.add_argument("--prepare-only", action="store_true")
    a = ap.parse_args()
    if not os.path.isdir(a.data):
        sys.exit(f"data not found: {a.data} (the 615-patient SMART NDJSON from ../shared)")
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "atlas-cli"], cwd=ROOT, check=True)
    os.makedirs(a.work, exist_ok=True)
    lake = prepare(a.atlas, a.data, a.factor, a.work)
    obs = sql_column(a.atlas, lake, "SELECT CAST(count(*) AS VARCHAR) FROM observation")[0]
    print(f"lake: {lake} ({obs} observations)", flush=True)
    if a.prepare_only:
        return
    ids = sql_column(a.atlas, lake, f"SELECT patient_id FROM observation WHERE left(effective, 4) >= '{DATE_FROM}' GROUP BY patient_id ORDER BY patient_id LIMIT 500")
    token = run([a.atlas, "--quiet", "--lake", lake, "token", "--sub", "bench", "--scope", "user/*.rs", "--ttl", "1d"]).strip()
    port = free_port()
    server = subprocess.Popen([a.atlas, "--quiet", "--lake", lake, "serve", "--dev-auth", "--bind", f"127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "ATLAS_LOG": "warn"})
    try:
        wait_for(port)
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for kind in ["objects", "graphql"]:
                lua = os.path.join(tmp, f"{kind}.lua")
                with open(lua, "w") as f:
                    f.write(WRK_LUA.replace("{IDS}", "{" + ",".join(f'"{i}"' for i in ids) + "}")
                            .replace("{TOKEN}", token).replace("{KIND}", kind)
                            .replace("{FROM}", DATE_FROM).replace("{TO}", DATE_TO))
                wrk(port, lua, 1, 3)  # warm up
                results[kind] = wrk(port, lua, 1, a.duration)
                print(f"{kind}: {results[kind]}", flush=True)
            results["soak200"] = wrk(port, os.path.join(tmp, "objects.lua"), 200, a.soak)
            print(f"soak200: {results['soak200']}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    # The same query with slice reads off: every request planned in
    # DataFusion over the same files (what the slice path saves).
    results["planned"] = measure_a(a, lake, ids, token, "slice_reads = false\n", None)
    print(f"planned: {results['planned']}", flush=True)
    # The same query under a policy file: an allow rule by subject that
    # needs a purpose of use, a deny rule over five patients outside the
    # requested set (a row predicate on every read) and a hidden field.
    vips = sql_column(a.atlas, lake, "SELECT id FROM patient ORDER BY id DESC LIMIT 5")
    vip_list = ", ".join(f'"{v}"' for v in vips if v not in ids)
    policy = ("[[rule]]\nid = \"bench\"\neffect = \"allow\"\nsubjects = [\"bench\"]\npurpose = [\"TREAT\"]\n"
              f"[[rule]]\nid = \"vip\"\neffect = \"deny\"\npatients = {{ ids = [{vip_list}] }}\n"
              "[[rule]]\nid = \"no-contact\"\neffect = \"deny\"\nhide = [\"Patient.telecom\"]\n")
    purposed = run([a.atlas, "--quiet", "--lake", lake, "token", "--sub", "bench", "--scope", "user/*.rs",
                    "--purpose", "TREAT", "--ttl", "1d"]).strip()
    # Without policy and audit, then with both, back to back in the same
    # run (every other row runs with the audit trail on, the default).
    results["nopolicy"] = measure_a(a, lake, ids, purposed, "[audit]\nenabled = false\n", None)
    results["policy"] = measure_a(a, lake, ids, purposed, "", policy)
    print(f"policy: {results['policy']} (without: {results['nopolicy']})", flush=True)
    duck = duckdb_latency(lake, ids, 2000)
    print(f"duckdb: {duck}", flush=True)
    print()
    print(f"| query ({obs} observations, x{a.factor}) | p50 ms | p99 ms | req/s | errors |")
    print("|---|---|---|---|---|")
    r = results["objects"]
    print(f"| A. loadObjects: one patient's observations, date range, by time, 250/page (1 conn) | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | {r['errors']} |")
    r = results["planned"]
    print(f"| A. same, slice reads off (`slice_reads = false`: every request planned in DataFusion) | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | {r['errors']} |")
    if duck:
        print(f"| A. DuckDB, same query over the same Parquet files (in process, prepared) | {duck['p50']:.2f} | {duck['p99']:.2f} | – | – |")
    r = results["graphql"]
    print(f"| B. GraphQL patient(id) {{ medicationRequests conditions }} (1 conn) | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | {r['errors']} |")
    r = results["soak200"]
    print(f"| C. A with 200 connections for {a.soak} s | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | {r['errors']} |")
    r = results["nopolicy"]
    print(f"| D. A, no policy file (SMART scopes only), audit off, same run as the next row | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | {r['errors']} |")
    r = results["policy"]
    print(f"| D. A under a policy file (allow by subject + purpose, deny 5 patients, hidden field), audit on | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | {r['errors']} |")
    print(f"\nPolicy + audit overhead on A: p50 {100 * (results['policy']['p50'] / results['nopolicy']['p50'] - 1):+.1f}%, "
          f"p99 {100 * (results['policy']['p99'] / results['nopolicy']['p99'] - 1):+.1f}%")
    if duck:
        print(f"\nA vs DuckDB: p50 {duck['p50'] / results['objects']['p50']:.2f}x, p99 {duck['p99'] / results['objects']['p99']:.2f}x (DuckDB time / Atlas time)")


if __name__ == "__main__":
    main()
