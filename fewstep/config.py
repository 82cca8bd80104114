"""Configs: recipe dataclasses carry the paper defaults; TOML presets under ``recipes/`` override them."""

from __future__ import annotations

from pathlib import Path


def presets_dir() -> Path:
    """The folder of TOML presets: ``fewstep/_presets`` in a wheel, ``<repo>/recipes`` in an editable install."""
    packaged = Path(__file__).resolve().parent / "_presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "recipes"
