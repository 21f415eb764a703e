"""Offline validation of generated Kubernetes objects against the CRDs in ../shared/crds."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRDS = Path(__file__).resolve().parents[1].parent / "shared" / "crds"


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large: libyaml is 10x faster
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v.get("storage", True))
            return version["schema"]["openAPIV3Schema"]
    raise LookupError(f"no CRD for kind {kind} in {CRDS}")


def validate(obj: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError when `obj` does not fit its CRD's OpenAPI schema."""
    schema = crd_schema(obj["kind"])
    # apiVersion/kind/metadata are checked by the API server's own schema; the CRD types them loosely.
    jsonschema.Draft7Validator(schema).validate(obj)
