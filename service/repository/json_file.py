"""The small JSON files that describe what is on disk (model manifests, engine profiles).

Read with errors that name the file and the key, raised as the caller's own error type, so a
broken folder is reported as what it is (a bad manifest, a bad profile).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_object(path: Path, error: type[ValueError], missing: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise error(missing) from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must be a JSON object")
    return data


def typed(data: dict[str, Any], key: str, kind: type, where: Path, error: type[ValueError]) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise error(f"{where}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value
