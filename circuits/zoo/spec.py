"""What names a trained model: a spec (a JSON-able dict) and its key.

A model is identified by a *spec*: a JSON-able dict that the caller builds from everything that
determines the trained weights (model config, data recipe, seed, training recipe, training-code
version, torch version). :func:`spec_key` hashes a canonical JSON encoding of it (sorted keys, no
whitespace, strict JSON: no NaN/inf, string keys only) with sha256 and returns the full 64-char hex
digest.  Note ``1`` and ``1.0`` are different specs; tuples are encoded as lists.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from circuits.errors import CircuitsError

__all__ = ["SpecError", "canonical_json", "spec_diff", "spec_key"]


class SpecError(CircuitsError, TypeError, ValueError):
    """A spec that cannot be hashed: not strict JSON (the message names the offending field)."""


def _normalize(obj: Any, path: str, *, allow_nan: bool, what: type[Exception]) -> Any:
    """A plain-JSON copy of ``obj`` (dict/list/str/int/float/bool/None), or ``what`` naming the field."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not allow_nan and not math.isfinite(obj):
            raise what(f"{path} is {obj!r}; non-finite floats are not allowed here")
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise what(f"{path} has a non-string key {k!r} ({type(k).__name__}); JSON keys must be str")
            out[str(k)] = _normalize(v, f"{path}[{k!r}]", allow_nan=allow_nan, what=what)
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalize(v, f"{path}[{i}]", allow_nan=allow_nan, what=what) for i, v in enumerate(obj)]
    raise what(
        f"{path} is a {type(obj).__module__}.{type(obj).__qualname__} ({obj!r:.80}), which is not JSON-able; "
        "use str/int/float/bool/None, lists and dicts with str keys (convert tensors/arrays/paths/enums first)"
    )


def canonical_json(spec: Mapping[str, Any]) -> str:
    """The canonical JSON text of ``spec`` that :func:`spec_key` hashes."""
    if not isinstance(spec, Mapping):
        raise SpecError(f"a spec must be a dict, got {type(spec).__name__}")
    plain = _normalize(spec, "spec", allow_nan=False, what=SpecError)
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def spec_key(spec: Mapping[str, Any]) -> str:
    """sha256 hex digest (64 chars) of the canonical JSON of ``spec``; :class:`SpecError` if not JSON-able."""
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix or "<spec>": obj}


def _short(value: Any, limit: int = 100) -> str:
    try:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def spec_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable lines naming the (dotted) spec fields that differ between ``old`` and ``new``."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for field in sorted(set(a) | set(b)):
        if field not in b:
            lines.append(f"- {field}: {_short(a[field])} (only in the reference)")
        elif field not in a:
            lines.append(f"+ {field}: {_short(b[field])} (only in the current spec)")
        elif _short(a[field], 10**9) != _short(b[field], 10**9):
            lines.append(f"~ {field}: {_short(a[field])} -> {_short(b[field])}")
    return lines
