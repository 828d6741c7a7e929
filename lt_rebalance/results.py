"""The JSON form of results, as ``--json`` prints them and results files hold them."""
from __future__ import annotations

import json
import math
from typing import Any


def jsonable(obj: Any) -> Any:
    """Convert results for JSON: NaN becomes null, tensors and numpy values become Python values."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / torch
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(result: Any) -> str:
    """The JSON document of ``result``."""
    return json.dumps(jsonable(result), indent=2)
