"""Prompt lists from a text file (one per line), JSONL or parquet (a ``prompt`` field or column, or another one)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FewstepError


def read_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FewstepError(f"prompt file {file} does not exist")
    if file.suffix == ".parquet":
        return _parquet_column(file, field)
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


def _parquet_column(file: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FewstepError("reading parquet prompts needs pyarrow: pip install 'fewstep[parquet]'") from None
    try:
        table = pq.read_table(file)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise FewstepError(f"{file} is not a readable parquet file: {str(err).splitlines()[0]}") from None
    if field not in table.column_names:
        raise FewstepError(f"{file} has no column {field!r}; columns: {', '.join(table.column_names)}")
    prompts = [str(p).strip() for p in table.column(field).to_pylist() if p is not None and str(p).strip()]
    if not prompts:
        raise FewstepError(f"{file} holds no prompts in column {field!r}")
    return prompts
