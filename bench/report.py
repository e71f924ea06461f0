"""What every benchmark does with its result: print one JSON object, and keep a copy where asked."""

from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, path: str | None) -> None:
    """Print ``report`` as one indented JSON object on stdout; also write it to ``path`` when given."""
    text = json.dumps(report, indent=1)
    print(text)
    if path:
        Path(path).write_text(text)
