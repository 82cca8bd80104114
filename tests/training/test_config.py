"""Config resolution: defaults < preset < --config < --set, checked against the dataclass; TOML round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.training.config import find_preset, parse_set, read_toml, resolve_config, to_toml


@dataclass(frozen=True)
class Inner:
    rank: int = 4
    targets: tuple[str, ...] = ("to_q", "to_k")


@dataclass(frozen=True)
class ToyConfig:
    lr: float = 1e-4
    steps: int = 100
    guidance: float | None = None
    times: tuple[float, ...] = (1.0, 0.5)
    name: str = "toy"
    lora: Inner = field(default_factory=Inner)


class ToyRecipe:
    """A registered recipe with a config and no training (for the CLI's --dry-run)."""

    Config: ClassVar[type] = ToyConfig
    paper: ClassVar[str] = "Toy et al. (2026)"


def test_layers_in_order(tmp_path: Path) -> None:
    preset = tmp_path / "p.toml"
    preset.write_text("lr = 3e-4\nsteps = 7\n[lora]\nrank = 8\n")
    config = tmp_path / "c.toml"
    config.write_text("steps = 9\n")
    cfg = resolve_config(ToyConfig(), preset, config, ["lora.targets=['a']", "guidance=2", "name=plain words"])
    assert cfg == ToyConfig(lr=3e-4, steps=9, guidance=2.0, name="plain words", lora=Inner(rank=8, targets=("a",)))


def test_toml_round_trip(tmp_path: Path) -> None:
    cfg = ToyConfig(lr=2e-5, guidance=1.5, times=(1.0, 0.3), lora=Inner(rank=2))
    (tmp_path / "r.toml").write_text(to_toml(cfg))
    assert resolve_config(ToyConfig(), config_file=tmp_path / "r.toml") == cfg


@pytest.mark.parametrize(
    "sets,match",
    [(["nope=1"], "unknown config key 'nope'"), (["lora.nope=1"], "unknown config key 'lora.nope'"),
     (["steps=1.5"], "steps: expected int"), (["times=3"], "times: expected a list"), (["lr"], "KEY=VALUE")],
)  # fmt: skip
def test_bad_overrides_are_one_line_errors(sets: list[str], match: str) -> None:
    with pytest.raises(FewstepError, match=match):
        resolve_config(ToyConfig(), sets=sets)


def test_parse_set_reads_toml_literals() -> None:
    assert parse_set(["a.b=1", "c=[1.0, 2]", "d=true", "e=hello"]) == {"a": {"b": 1}, "c": [1.0, 2], "d": True,
                                                                          "e": "hello"}  # fmt: skip


def test_distill_dry_run_prints_resolved_config(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fewstep.recipes as registry

    monkeypatch.setitem(registry.BUILTIN, "toy", "test_config:ToyRecipe")
    assert main(["distill", "--recipe", "toy", "--set", "steps=5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "steps = 5" in out and "[lora]" in out
    assert main(["distill", "--recipe", "toy", "--preset", "missing", "--dry-run"]) == 2
    assert "no preset 'missing'" in capsys.readouterr().err


def test_literal_fields_accept_only_their_values() -> None:
    from fewstep.recipes.scm import SCMConfig

    assert resolve_config(SCMConfig(), sets=["jvp=fd"]).jvp == "fd"
    with pytest.raises(FewstepError, match="expected one of 'auto', 'jvp', 'fd'"):
        resolve_config(SCMConfig(), sets=["jvp=forward"])


@pytest.mark.parametrize("recipe", ["lcm", "scm", "rcm", "sid", "tdm", "phased_dmd"])
def test_digits_presets_are_the_default_for_the_digits_teacher(recipe: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["distill", "--recipe", recipe, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"recipes/{recipe}/digits.toml" in out or f"_presets/{recipe}/digits.toml" in out
    preset = read_toml(find_preset(recipe, "digits"))
    assert f"max_minutes = {float(preset['train']['max_minutes'])}" in out
    assert main(["distill", "--recipe", recipe, "--teacher", "some/hub-id", "--dry-run"]) == 0
    assert "max_minutes" not in capsys.readouterr().out  # other teachers start from the paper defaults


def test_every_preset_resolves_against_its_recipe_config() -> None:
    """Each recipes/<recipe>/<preset>.toml names only fields of its recipe's dataclass, with values of their types."""
    from fewstep.recipes import available, resolve
    from fewstep.training.config import presets_dir

    found = 0
    for recipe in available():
        for preset in sorted((presets_dir() / recipe).glob("*.toml")):
            resolve_config(resolve(recipe).Config(), preset=preset)  # raises on an unknown key or a wrong type
            found += 1
    assert found >= 10


def test_presets_dir_holds_every_recipes_digits_preset() -> None:
    from fewstep.recipes import available
    from fewstep.training.config import presets_dir

    assert all((presets_dir() / name / "digits.toml").is_file() for name in available())
