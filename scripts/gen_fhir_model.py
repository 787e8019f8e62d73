#!/usr/bin/env python3
"""Generate the compact FHIR R4 model table used by atlas-fhirpath.

Input: the npm package `hl7.fhir.r4b.core@4.3.0` (StructureDefinitions), unpacked
in a temporary directory; it is never committed. Optionally the npm package
`fhirpath@5.2.2`, whose `fhir-context/r4/` tables are used only to cross-check
the generated table (discrepancies are printed, nothing is copied).

Usage:
    tmp=$(mktemp -d) && (cd "$tmp" && npm pack hl7.fhir.r4b.core@4.3.0 fhirpath@5.2.2 \
        && for f in *.tgz; do mkdir "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done)
    python3 scripts/gen_fhir_model.py \
        --core "$tmp/hl7.fhir.r4b.core-4.3.0/package" \
        --fhirpath "$tmp/fhirpath-5.2.2/package" \
        --out crates/atlas-fhirpath/src/model/r4.json

Output format (see crates/atlas-fhirpath/MODEL.md):
    {"source": ..., "types": {name: [kind, base]}, "elements": {owner: {name: spec}}}
where owner is a type name or a backbone path ("Patient.contact"), and spec is
`*` (repeats) + `?` (choice element, JSON name is name + TypeName) + type codes
joined by `|`. A type code is a FHIR type name, `System.X`, or `#Path` for a
backbone element / content reference defined at Path.
"""
import argparse
import glob
import json
import os
import re
import sys

FHIR_TYPE_EXT = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
SYSTEM_PREFIX = "http://hl7.org/fhirpath/System."
# Datatypes introduced by R4B (absent from R4 4.0.1): dropped, and removed from choice lists.
R4B_ONLY_DATATYPES = {"CodeableReference", "RatioRange", "DataType"}
COMPLEX_CONSTRAINTS_KEPT = {"Age", "Count", "Distance", "Duration", "MoneyQuantity", "SimpleQuantity"}


def r4_resource_types(repo_root):
    """The R4 (4.0.1) resource type list the workspace already owns (atlas-fhir)."""
    path = os.path.join(repo_root, "crates", "atlas-fhir", "src", "resource_types.rs")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    body = text.split("R4_RESOURCE_TYPES", 1)[1].split("];", 1)[0]
    return set(re.findall(r'"([A-Za-z]+)"', body))


def type_code(t, owner_kind, path):
    code = t["code"]
    if code.startswith(SYSTEM_PREFIX):
        for ext in t.get("extension", []):
            if ext.get("url") == FHIR_TYPE_EXT:
                fhir = ext.get("valueUrl") or ext.get("valueUri")
                if path.endswith(".id"):
                    # R4: Resource.id is `id`, Element.id is `string` (R4B says `id` for both).
                    return "id" if owner_kind == "resource" else "string"
                return fhir
        return "System." + code[len(SYSTEM_PREFIX):]
    return code


def load_core(core_dir, r4_resources):
    sds = {}
    for f in sorted(glob.glob(os.path.join(core_dir, "StructureDefinition-*.json"))):
        with open(f, encoding="utf-8") as fh:
            d = json.load(fh)
        if d.get("resourceType") != "StructureDefinition":
            continue
        kind = d.get("kind")
        if kind not in ("resource", "complex-type", "primitive-type"):
            continue
        name = d.get("type") if d.get("derivation") == "specialization" else d.get("name")
        if d.get("derivation") == "constraint":
            if kind != "complex-type" or d.get("name") not in COMPLEX_CONSTRAINTS_KEPT:
                continue
            name = d["name"]
        if not d.get("url", "").startswith("http://hl7.org/fhir/StructureDefinition/"):
            continue
        sds[name] = d
    return sds


def build(sds, r4_resources):
    types = {}
    elements = {}
    dropped_r4b_only = []
    for name, d in sorted(sds.items()):
        kind = d["kind"]
        if name in R4B_ONLY_DATATYPES:
            dropped_r4b_only.append(name)
            continue
        if kind == "resource" and not d.get("abstract") and name not in r4_resources:
            dropped_r4b_only.append(name)
            continue
        base = (d.get("baseDefinition") or "").rsplit("/", 1)[-1] or None
        if base == "DataType":  # R4B inserted DataType between Element and the datatypes
            base = "Element"
        kind_short = {"resource": "resource", "complex-type": "complex", "primitive-type": "primitive"}[kind]
        types[name] = [kind_short, base]

    def own_names(tname):
        d = sds.get(tname)
        if d is None:
            return set()
        root = d["snapshot"]["element"][0]["path"]
        out = set()
        for e in d["snapshot"]["element"][1:]:
            p = e["path"]
            rest = p[len(root) + 1:]
            if "." not in rest:
                out.add(rest.replace("[x]", ""))
        return out

    for name in sorted(types):
        d = sds[name]
        kind = d["kind"]
        if kind == "primitive-type":
            continue  # id + extension come from Element; `.value` is not navigable
        base = types[name][1]
        inherited = own_names(base) if base else set()
        snap = d["snapshot"]["element"]
        root = snap[0]["path"]
        children_of = {}
        for e in snap[1:]:
            path = e["path"]
            parent, _, leaf = path.rpartition(".")
            children_of.setdefault(parent, []).append((leaf, e))
        for parent, kids in children_of.items():
            owner = name if parent == root else name + parent[len(root):]
            table = elements.setdefault(owner, {})
            for leaf, e in kids:
                if e.get("max") == "0":
                    continue
                choice = leaf.endswith("[x]")
                key = leaf[:-3] if choice else leaf
                if parent == root and key in inherited and base not in ("Resource", "Element"):
                    continue
                if parent == root and key in inherited:
                    continue
                path_rel = name + e["path"][len(root):]
                if "contentReference" in e:
                    ref = e["contentReference"].lstrip("#")
                    # R4B content references name the defining path (e.g. Questionnaire.item).
                    codes = ["#" + ref]
                elif e["path"] in children_of:
                    codes = ["#" + path_rel]
                    types[path_rel] = ["backbone", e["type"][0]["code"]]
                else:
                    codes = [type_code(t, kind, e["path"]) for t in e.get("type", [])]
                    # keep order, drop duplicates (Reference(A|B) lists one code)
                    seen = []
                    for c in codes:
                        if c not in seen:
                            seen.append(c)
                    codes = [c for c in seen if c not in R4B_ONLY_DATATYPES]
                spec = ("*" if e.get("max") not in ("1", "0") else "") + ("?" if choice else "") + "|".join(codes)
                table[key] = spec
    return types, elements, dropped_r4b_only


def cross_check(types, elements, fp_dir):
    ctx = os.path.join(fp_dir, "fhir-context", "r4")
    with open(os.path.join(ctx, "type2Parent.json")) as f:
        type2parent = json.load(f)
    with open(os.path.join(ctx, "choiceTypePaths.json")) as f:
        choices = json.load(f)
    with open(os.path.join(ctx, "pathsDefinedElsewhere.json")) as f:
        elsewhere = json.load(f)
    problems = []
    for t, parent in sorted(type2parent.items()):
        if t not in types:
            problems.append(f"type {t} (R4, parent {parent}) missing from generated table")
        elif types[t][1] != parent:
            problems.append(f"type {t}: base {types[t][1]} here, {parent} in fhirpath r4")
    for t in sorted(types):
        if types[t][0] != "backbone" and t not in type2parent and types[t][1]:
            problems.append(f"type {t} here but not in fhirpath r4 type2Parent")

    def lookup(path):
        owner, _, leaf = path.rpartition(".")
        seen = set()
        while owner and owner not in seen:
            seen.add(owner)
            table = elements.get(owner, {})
            if leaf in table:
                return table[leaf]
            owner = (types.get(owner) or [None, None])[1]
            if owner and owner.startswith("#"):
                owner = owner[1:]
        return None

    for path, tys in sorted(choices.items()):
        spec = lookup(path)
        if spec is None:
            problems.append(f"choice {path} missing")
            continue
        if "?" not in spec:
            problems.append(f"choice {path} not a choice here ({spec})")
            continue
        ours = {c[0].upper() + c[1:] for c in spec.lstrip("*?").split("|")}
        if ours != set(tys):
            problems.append(f"choice {path}: {sorted(ours ^ set(tys))} differ")
    for path, target in sorted(elsewhere.items()):
        spec = lookup(path)
        if spec is None:
            problems.append(f"content reference {path} missing")
        elif spec.lstrip("*?") != "#" + target:
            problems.append(f"content reference {path}: {spec} here, #{target} in fhirpath r4")
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--core", required=True, help="unpacked hl7.fhir.r4b.core package/ directory")
    ap.add_argument("--fhirpath", help="unpacked fhirpath package/ directory (cross-check only)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r4_resources = r4_resource_types(repo_root)
    sds = load_core(args.core, r4_resources)
    types, elements, dropped = build(sds, r4_resources)
    missing_r4 = sorted(r for r in r4_resources if r not in types)
    out = {
        "source": "hl7.fhir.r4b.core@4.3.0, restricted to the R4 4.0.1 resource list of atlas-fhir",
        "types": dict(sorted(types.items())),
        "elements": {k: dict(sorted(v.items())) for k, v in sorted(elements.items())},
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, separators=(",", ":"), sort_keys=False)
        f.write("\n")
    print(f"wrote {args.out}: {len(types)} types, {sum(len(v) for v in elements.values())} elements")
    print(f"R4B-only types dropped ({len(dropped)}): {', '.join(dropped)}")
    print(f"R4 resources absent from R4B ({len(missing_r4)}): {', '.join(missing_r4)}")
    if args.fhirpath:
        problems = cross_check(types, elements, args.fhirpath)
        print(f"cross-check against fhirpath r4 tables: {len(problems)} discrepancies")
        for p in problems:
            print("  " + p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
