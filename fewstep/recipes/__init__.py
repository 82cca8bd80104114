"""The recipe registry: built-in recipes as lazy ``"module:Class"`` strings plus the ``fewstep.recipes`` entry-point
group, so a third-party package can add a recipe without touching fewstep. Importing this module does not import
torch; a recipe's module is imported only when it is used."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from ..errors import FewstepError

ENTRY_POINT_GROUP = "fewstep.recipes"

# name -> "module:Class"; recipes register here as their issues land.
BUILTIN: dict[str, str] = {
    "lcm": "fewstep.recipes.lcm:LCM",
    "scm": "fewstep.recipes.scm:SCM",
    "rcm": "fewstep.recipes.rcm:RCM",
    "phased_dmd": "fewstep.recipes.phased_dmd:PhasedDMD",
    "sid": "fewstep.recipes.sid:SiD",
    "tdm": "fewstep.recipes.tdm:TDM",
    "mcm": "fewstep.recipes.mcm:MCM",
    "dcm": "fewstep.recipes.dcm:DCM",
    "hyper_sd": "fewstep.recipes.hyper_sd:HyperSD",
}

# the embedded world a recipe trains on when no teacher is named (the video recipes need clips)
VIDEO_RECIPES = ("mcm", "dcm")


def default_world(name: str) -> str:
    """The embedded teacher ``fewstep distill --recipe NAME`` uses by default: "video" or "digits"."""
    return "video" if name in VIDEO_RECIPES else "digits"


def available() -> dict[str, str]:
    """Every registered recipe: built-ins first, then entry points (which cannot shadow a built-in)."""
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def resolve(name: str) -> Any:
    """The recipe class registered under ``name``; a one-line FewstepError when there is none."""
    registry = available()
    if name not in registry:
        if not registry:
            raise FewstepError(f"unknown recipe {name!r}: no recipes are registered yet")
        raise FewstepError(f"unknown recipe {name!r}; registered: {', '.join(sorted(registry))}")
    module_name, _, attr = registry[name].partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise FewstepError(
            f"recipe {name!r} is registered as {registry[name]} but cannot be imported: {err}"
        ) from None
