#!/usr/bin/env python3
"""Independent reader check: open an Atlas lake's Delta tables with DuckDB's
delta extension (delta-kernel-rs, not delta-rs) and compare with `atlas stats --json`.

usage: check_lake.py <lake-dir> <stats.json>

Checks: per-type live/deleted counts, quarantine counts per reason, batch
count, and for rows that came from plain NDJSON files, that the stored
resource equals the original line byte for byte.
"""
import glob
import json
import os
import sys

import duckdb


def delta_extension():
    import duckdb_extension_delta

    base = os.path.dirname(duckdb_extension_delta.__file__)
    found = glob.glob(os.path.join(base, "extensions", "*", "delta.duckdb_extension"))
    if not found:
        sys.exit("duckdb-extension-delta has no delta.duckdb_extension")
    return found[0]


def main():
    lake, stats_path = sys.argv[1], sys.argv[2]
    with open(stats_path) as f:
        stats = json.load(f)
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    con.execute(f"LOAD '{delta_extension()}'")
    t = lambda name: f"delta_scan('{os.path.join(lake, 'tables', name)}')"

    got = {}
    for rt, live, deleted in con.execute(
        f"SELECT resource_type, sum(CASE WHEN deleted THEN 0 ELSE 1 END), sum(CASE WHEN deleted THEN 1 ELSE 0 END) "
        f"FROM {t('resources')} GROUP BY 1"
    ).fetchall():
        got[rt] = {"live": int(live), "deleted": int(deleted)}
    if got != stats["resources"]:
        sys.exit(f"resource counts differ:\n duckdb {got}\n atlas  {stats['resources']}")

    q = {}
    if os.path.isdir(os.path.join(lake, "tables", "quarantine", "_delta_log")):
        q = {r: int(n) for r, n in con.execute(f"SELECT reason, count(*) FROM {t('quarantine')} GROUP BY 1").fetchall()}
    if q != stats["quarantine"]:
        sys.exit(f"quarantine counts differ:\n duckdb {q}\n atlas  {stats['quarantine']}")

    (nb,) = con.execute(f"SELECT count(*) FROM {t('batches')}").fetchone()
    if nb != len(stats["batches"]):
        sys.exit(f"batch count differs: duckdb {nb}, atlas {len(stats['batches'])}")

    # Byte-exact storage and lineage: the row's file:line is the stored text.
    rows = con.execute(
        f"SELECT file, line, resource FROM {t('resources')} WHERE NOT deleted AND file LIKE '%.ndjson' "
        f"USING SAMPLE 500 ROWS"
    ).fetchall()
    lines_cache = {}
    checked = 0
    for file, line, resource in rows:
        if not os.path.exists(file):
            continue
        if file not in lines_cache:
            with open(file, "rb") as f:
                lines_cache[file] = f.read().split(b"\n")
        original = lines_cache[file][line - 1].rstrip(b"\r").decode("utf-8")
        if original != resource:
            sys.exit(f"{file}:{line}: stored resource differs from the input line")
        checked += 1
    total = sum(v["live"] + v["deleted"] for v in got.values())
    print(f"duckdb delta_scan agrees: {total} resources in {len(got)} types, "
          f"{sum(q.values())} quarantined, {nb} batches, {checked} rows byte-exact")


if __name__ == "__main__":
    main()
