#!/usr/bin/env python3
"""Independent reader check for materialized views: open every view table under
<lake>/views/ with DuckDB's delta extension (delta-kernel-rs, not delta-rs) and
compare per-view fingerprints with the ones Atlas computed through `atlas sql`.

usage: check_views.py <lake-dir> <expected.json>

expected.json: {"<view>": {"rows": n, "patients": n, "keys": n, "checksum": "..."}}
where checksum is the sum over rows of the decimal column named in
"decimal_column" (kept exact: DuckDB reads Delta decimal(38,18) as DECIMAL).
"""
import json
import os
import sys

import duckdb

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_lake import delta_extension  # noqa: E402


def main():
    lake, expected_path = sys.argv[1], sys.argv[2]
    with open(expected_path) as f:
        expected = json.load(f)
    con = duckdb.connect(config={"allow_unsigned_extensions": "true"})
    con.execute(f"LOAD '{delta_extension()}'")
    failures = []
    for view, want in sorted(expected.items()):
        scan = f"delta_scan('{os.path.join(lake, 'views', view)}')"
        rows, patients, keys = con.execute(
            f"SELECT count(*), count(DISTINCT patient_id), count(DISTINCT id) FROM {scan}"
        ).fetchone()
        got = {"rows": rows, "patients": patients, "keys": keys}
        col = want.get("decimal_column")
        if col:
            typ = con.execute(f"SELECT typeof({col}) FROM {scan} LIMIT 1").fetchone()
            total = con.execute(f"SELECT CAST(sum({col}) AS VARCHAR) FROM {scan}").fetchone()[0]
            got["decimal_type"] = typ[0] if typ else None
            got["checksum"] = total
        for k, v in got.items():
            if k in want and str(want[k]) != str(v):
                failures.append(f"{view}.{k}: atlas {want[k]} vs duckdb {v}")
        print(f"{view}: {got}")
    if failures:
        print("MISMATCH:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print(f"duckdb delta_scan agrees on {len(expected)} views")


if __name__ == "__main__":
    main()
