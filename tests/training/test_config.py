"""Config resolution: defaults < preset < --config < --set, checked against the dataclass; TOML round trip."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from fewstep.cli import main
from fewstep.errors import FewstepError
from fewstep.training.config import Rule, find_preset, parse_set, read_toml, resolve_config, to_toml, validate_config


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


def test_video_presets_distil_the_scale_the_video_teacher_samples_with() -> None:
    """The students sample at w 1, so their presets distil the teacher's scale; at every sigma, not on its sampling
    interval, which both distilled worse (the presets' comments)."""
    from fewstep.recipes.dcm import DCMConfig
    from fewstep.recipes.mcm import MCMConfig
    from fewstep.worlds import TEACHER_GUIDANCE

    mcm = resolve_config(MCMConfig(), preset=find_preset("mcm", "video"))
    dcm = resolve_config(DCMConfig(), preset=find_preset("dcm", "video"))
    assert mcm.w_min == mcm.w_max == dcm.guidance == TEACHER_GUIDANCE["video"]
    assert mcm.guidance_interval is None and dcm.guidance_interval is None


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


def test_presets_dir_holds_every_recipes_preset_for_its_world() -> None:
    """Each recipe has a preset for the embedded world it trains on by default (digits, or video for MCM / DCM)."""
    from fewstep.recipes import available, default_world
    from fewstep.training.config import presets_dir

    assert default_world("mcm") == "video" and default_world("lcm") == "digits"
    assert all((presets_dir() / name / f"{default_world(name)}.toml").is_file() for name in available())


def _numeric(hint: object) -> bool:
    """Whether a field's type holds numbers (int or float, alone, optional, or in a tuple or list); bool does not."""
    import typing

    if hint in (int, float):
        return True
    return any(_numeric(arg) for arg in typing.get_args(hint) if arg is not Ellipsis)


def _fields(cls: type, where: str = "") -> list[tuple[str, str, object]]:
    """(key, field name, type hint) of every field of a config dataclass, nested dataclasses walked into."""
    import dataclasses
    import typing

    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out += _fields(hint, f"{where}{f.name}.")  # type: ignore[arg-type]
        else:
            out.append((f"{where}{f.name}", f.name, hint))
    return out


def test_every_numeric_field_of_every_recipe_is_classified() -> None:
    """A new numeric config field must get a rule (a range) or be listed as FREE in fewstep/training/config.py."""
    from fewstep.recipes import available, resolve
    from fewstep.training.config import rule_for

    missing = [
        f"{recipe}: {key}"
        for recipe in available()
        for key, name, hint in _fields(resolve(recipe).Config)
        if _numeric(hint) and rule_for(name) is None
    ]
    assert not missing, "classify these fields in RULES (fewstep/training/config.py): " + ", ".join(missing)
    assert rule_for("anti_guidance") == rule_for("p_mean") == rule_for("kappa3") == Rule()  # free on purpose


def test_every_recipe_default_passes_validation() -> None:
    from fewstep.recipes import available, resolve

    for recipe in available():
        validate_config(resolve(recipe).Config())


@pytest.mark.parametrize(
    "sets,match",
    [(["train.max_steps=0"], r"train\.max_steps must be >= 1, got 0"),
     (["lr=-1e-4"], r"^lr must be > 0, got -0\.0001"), (["train.ema_decay=nan"], "train.ema_decay must be in"),
     (["train.lr_warmup_steps=-1"], "must be >= 0"), (["plan_steps=[1, 0]"], r"must hold values >= 1, got \[1, 0\]"),
     (["betas=[0.9, 1.0]"], r"betas must hold values in \[0, 1\)"), (["gamma=1.01"], r"gamma must be in \[0, 1\]"),
     (["adv_weight=-1"], "adv_weight must be >= 0"), (["train.max_minutes=0"], "max_minutes must be > 0")],
)  # fmt: skip
def test_out_of_range_values_name_their_key(sets: list[str], match: str) -> None:
    from fewstep.recipes.lcm import LCMConfig

    with pytest.raises(FewstepError, match=match):
        resolve_config(LCMConfig(), sets=sets)


def test_a_guidance_interval_is_an_increasing_pair() -> None:
    from fewstep.recipes.mcm import MCMConfig

    assert resolve_config(MCMConfig(), sets=["guidance_interval=[0.2, 0.85]"]).guidance_interval == (0.2, 0.85)
    for bad, match in (("[0.85, 0.2]", "must be increasing"), ("[-0.1, 0.5]", "must hold values >= 0"),
                       ("[0.1, 0.2, 0.3]", "does not fit")):  # fmt: skip
        with pytest.raises(FewstepError, match=match):
            resolve_config(MCMConfig(), sets=[f"guidance_interval={bad}"])


def test_free_and_optional_values_pass() -> None:
    from fewstep.recipes.sid import SiDConfig

    cfg = resolve_config(SiDConfig(), sets=["anti_guidance=-3", "adv_p_mean=-2", "train.max_minutes=0.5", "gamma=0"])
    assert cfg.anti_guidance == -3.0 and cfg.train.max_minutes == 0.5
    validate_config(cfg)


@pytest.mark.parametrize(
    "sets", [["lr=inf"], ["adv_weight=inf"], ["huber_c=inf"], ["adv_p_mean=nan"], ["w_min=nan"], ["train.seed=inf"]]
)
def test_nan_and_infinity_are_refused_where_they_mean_nothing(sets: list[str]) -> None:
    """NaN passes no bound (and no x_min <= x_max check), and infinity is no learning rate or weight: both would start
    a run that only produces NaN losses."""
    from fewstep.recipes.lcm import LCMConfig

    with pytest.raises(FewstepError, match="must be|expected int"):
        resolve_config(LCMConfig(), sets=sets)


def test_infinity_stays_an_off_switch_where_it_means_one() -> None:
    from fewstep.recipes.scm import SCMConfig

    cfg = resolve_config(SCMConfig(), sets=["time_max_freq=inf", "train.max_minutes=inf", "train.grad_clip=inf"])
    assert math.isinf(cfg.time_max_freq) and math.isinf(cfg.train.max_minutes)
