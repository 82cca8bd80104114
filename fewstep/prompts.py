"""Prompt lists from a text file (one per line) or JSONL (a ``prompt`` field, or another named field)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FewstepError


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FewstepError(f"prompt file {file} does not exist")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix == ".jsonl":
        try:
            prompts = [str(json.loads(line)[field]) for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FewstepError(f"{file}: every line must be a JSON object with a {field!r} field") from None
    else:
        prompts = lines
    if not prompts:
        raise FewstepError(f"prompt file {file} holds no prompts")
    return prompts
