#!/usr/bin/env bash
# Runs every Atlas test: unit and property tests, end-to-end CLI tests, crash
# tests, the S3 lake test against a local moto server, the DuckDB independent
# reader check, and the real-data tests over ../shared when it is present.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python tools used by tests (DuckDB's delta reader, moto's S3 server, an
# OpenAPI validator), pinned, in .venv.
if ! .venv/bin/python -c "import duckdb, duckdb_extension_delta, moto, openapi_spec_validator" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet "duckdb==1.5.5" "duckdb-extension-delta==1.5.5" "moto[server]==5.2.5" \
    "openapi-spec-validator==0.7.2"
fi
export ATLAS_PYTHON="$PWD/.venv/bin/python"
export ATLAS_MOTO_SERVER="$PWD/.venv/bin/moto_server"
[ -d ../shared/data/fhir ] || echo "NOTE: ../shared is missing: the real-data tests will say so and skip (they fail under CI=true)."

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
