"""Trim KubeRay CRDs to what tests/test_cluster.py validates against: each served version's openAPIV3Schema.

    python tests/data/kuberay-crds/trim.py --version v1.7.0 CRD.yaml [CRD.yaml ...]

CRD.yaml: the upstream files ray.io_rayclusters.yaml, ray.io_rayjobs.yaml, ray.io_rayservices.yaml from
https://github.com/ray-project/kuberay/tree/<version>/helm-chart/kuberay-operator/crds (about 1 MB each).
Writes <kind>.json beside this script (e.g. RayJob.json): compact, sorted JSON holding the CRD's group,
kind, the KubeRay version, where it came from, and for each version the test uses (`--keep`, default v1) its
served/storage flags and openAPIV3Schema with the `description` keywords removed (documentation only; no
validation keyword is dropped: types, properties, required, enums, formats, patterns, anyOf, items,
additionalProperties, x-kubernetes-* all stay). Versions not kept are listed under `notVendored`, so a
manifest that uses one fails with a message that says so. Re-run it after upgrading KubeRay and update
README.md here with the new version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
UPSTREAM = "https://github.com/ray-project/kuberay/blob/{version}/helm-chart/kuberay-operator/crds/{name}"

# Keywords whose values are maps from names to schemas, and keywords whose values are schemas or lists of
# schemas: the walk below visits exactly these, so a property *named* "description" is kept.
SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
SCHEMA_VALUES = ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf", "additionalItems")


def strip_descriptions(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema without its `description` keywords (at every level)."""
    if isinstance(schema, list):
        return [strip_descriptions(s) for s in schema]
    if not isinstance(schema, dict):
        return schema  # e.g. additionalProperties: true
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
        elif key in SCHEMA_VALUES:
            out[key] = strip_descriptions(value)
        else:
            out[key] = value  # enum, required, default, x-kubernetes-validations ...: data, kept as is
    return out


def trim(crd_path: Path, version: str, keep: list[str]) -> tuple[str, dict]:
    text = crd_path.read_text()
    crd = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if crd.get("kind") != "CustomResourceDefinition":
        raise SystemExit(f"{crd_path}: kind {crd.get('kind')!r}, expected CustomResourceDefinition")
    spec = crd["spec"]
    versions = {v["name"]: v for v in spec["versions"]}
    missing = [k for k in keep if k not in versions]
    if missing:
        raise SystemExit(f"{crd_path}: no version {missing}; it has {sorted(versions)}")
    kind = spec["names"]["kind"]
    out = {
        "kind": kind,
        "group": spec["group"],
        "kuberayVersion": version,
        "source": UPSTREAM.format(version=version, name=crd_path.name),
        "sourceSha256": hashlib.sha256(text.encode()).hexdigest(),
        "versions": {
            name: {
                "served": bool(versions[name].get("served")),
                "storage": bool(versions[name].get("storage")),
                "openAPIV3Schema": strip_descriptions(versions[name]["schema"]["openAPIV3Schema"]),
            }
            for name in keep
        },
        "notVendored": sorted(n for n in versions if n not in keep),
    }
    return kind, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("crds", nargs="+", type=Path, help="upstream CRD YAML files")
    p.add_argument("--version", required=True, help="the KubeRay release they come from, e.g. v1.7.0")
    p.add_argument("--keep", action="append", default=None, help="CRD version to vendor (default: v1)")
    p.add_argument("--out", type=Path, default=HERE, help="output folder (default: beside this script)")
    args = p.parse_args(argv)
    for path in args.crds:
        kind, data = trim(path, args.version, args.keep or ["v1"])
        target = args.out / f"{kind}.json"
        target.write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")
        print(f"{path} ({path.stat().st_size:,} bytes) -> {target} ({target.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
