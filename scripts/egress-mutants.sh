#!/usr/bin/env bash
# Mutation check of the egress seam (issue 19): disables each duty of
# `atlas_access::Egress` in turn (the lines marked `duty: <name>` in
# crates/atlas-access/src/egress.rs) and runs the tests that must catch it.
# Every mutant must make at least one test fail; the file is restored after
# each run, whatever happens.
#
#   scripts/egress-mutants.sh            # every duty
#   scripts/egress-mutants.sh hidden-field
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/atlas-target}"
file=crates/atlas-access/src/egress.rs
backup=$(mktemp)
cp "$file" "$backup"
trap 'cp "$backup" "$file"; rm -f "$backup"' EXIT
# The tests that stand guard: the access matrix, hidden fields and de-identified
# FHIR, and the audit's patients on every path.
filter='test(access_matrix) | test(denied_types_and_hidden_fields) | test(deid_grants) | test(egress::)'
duties=("${@:-patient-note count hidden-field deid-resource}")
status=0
for duty in ${duties[@]}; do
  cp "$backup" "$file"
  # Each marked line is a statement or a chained call that can be removed
  # alone and still compile.
  sed -i "/duty: ${duty}\$/d" "$file"
  if cmp -s "$file" "$backup"; then
    echo "mutant $duty: no line marked 'duty: $duty'"; status=1; continue
  fi
  if cargo nextest run -p atlas-serve --no-fail-fast -E "$filter" >"/tmp/mutant-$duty.log" 2>&1; then
    echo "mutant $duty: SURVIVED (no test failed) - see /tmp/mutant-$duty.log"; status=1
  else
    failed=$(grep -E '^\s+FAIL ' "/tmp/mutant-$duty.log" | sed -E 's/.*atlas-serve::it //' | sort -u | tr '\n' ' ')
    echo "mutant $duty: killed by: $failed"
  fi
done
exit $status
