"""Where a benchmark's numbers go: ``results/<name>.json``, its markdown beside it, and a summary on stdout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def publish(result: dict, out: Path, name: str, markdown: Callable[[dict], list[str]],
            hidden: tuple[str, ...] = ()) -> dict:
    """Write ``out/name.json`` and ``out/name.md`` (from ``markdown(result)``); print the result less ``hidden``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text("\n".join(markdown(result)) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in hidden}, indent=2))
    return result
