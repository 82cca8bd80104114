"""Configs: recipe dataclasses carry the paper defaults; TOML presets under ``recipes/`` override them.

Resolution order, later wins: the dataclass defaults, the preset ``recipes/<recipe>/<preset>.toml``, a ``--config``
file, then ``--set a.b=value`` overrides. Values of ``--set`` are read as TOML literals (``3``, ``1e-4``, ``true``,
``[1.0, 0.5]``, ``"text"``), falling back to a bare string. Unknown keys and ill-typed values are one-line errors,
and so are values out of range: ``validate_config`` checks every field of the resolved config (Literal fields against
their values, numbers against ``RULES``, a table keyed by field name) before anything is written.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FewstepError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def presets_dir() -> Path:
    """The folder of TOML presets: ``fewstep/_presets`` in a wheel, ``<repo>/recipes`` in an editable install."""
    package = Path(__file__).resolve().parents[1]  # fewstep/
    packaged = package / "_presets"
    if packaged.is_dir():
        return packaged
    return package.parent / "recipes"


def find_preset(recipe: str, name: str) -> Path:
    folder = presets_dir() / recipe
    path = folder / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []
        raise FewstepError(f"recipe {recipe!r} has no preset {name!r}; presets: {', '.join(known) or 'none'}")
    return path


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FewstepError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise FewstepError(f"{path} is not valid TOML: {err}") from None


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise FewstepError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a dataclass field's type hint, converting only where it loses nothing."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value not in args:
            raise FewstepError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except FewstepError:
                continue
        raise FewstepError(f"{where}: {value!r} does not fit {hint}")
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        if not isinstance(value, list | tuple):
            raise FewstepError(f"{where}: expected a list, got {value!r}")
        fixed = origin is tuple and len(args) > 1 and args[-1] is not Ellipsis  # tuple[float, float]: exactly 2
        if fixed and len(value) != len(args):
            raise FewstepError(f"{where}: {list(value)} does not fit {hint} ({len(args)} items)")
        item = args[0] if args and (len(args) == 1 or args[1] is Ellipsis) else Any
        items = [_coerce(v, args[i] if fixed else item, where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or hint is tuple else items
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise FewstepError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def merge_into(cfg: Any, overrides: Mapping[str, Any], where: str = "") -> Any:
    """A copy of dataclass ``cfg`` with ``overrides`` (nested dicts for nested dataclasses) applied and checked."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        name = f"{where}{key}"
        if key not in fields:
            raise FewstepError(f"unknown config key {name!r}; known: {', '.join(sorted(fields))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = merge_into(current, value, f"{name}.")
        else:
            changes[key] = _coerce(value, hints[key], name)
    return dataclasses.replace(cfg, **changes)


def resolve_config(
    default: Any, preset: Path | None = None, config_file: Path | None = None, sets: Sequence[str] = ()
) -> Any:
    """Defaults, then the preset, the config file and the ``--set`` overrides, each checked against the dataclass."""
    cfg = default
    for layer in (read_toml(preset) if preset else {}, read_toml(config_file) if config_file else {}, parse_set(sets)):
        cfg = merge_into(cfg, layer)
    validate_config(cfg)
    return cfg


@dataclass(frozen=True)
class Rule:
    """What a config value must satisfy: numbers (each item of a list) within bounds, strings among ``choices``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    non_empty: bool = False  # lists: at least one item
    choices: tuple[str, ...] = ()
    allow_inf: bool = False  # +-inf accepted (budgets and cut-offs where inf means "off"); NaN never is
    increasing: bool = False  # lists: each item above the one before (intervals)

    def bounds(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}" if self.low is not None else "a finite number"
        lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {lo}{self.low:g}, {self.high:g}{hi}"

    def _fits(self, x: float) -> bool:
        if math.isnan(x) or (math.isinf(x) and not self.allow_inf):
            return False
        low_ok = self.low is None or (x > self.low if self.low_open else x >= self.low)
        return low_ok and (self.high is None or (x < self.high if self.high_open else x <= self.high))

    def problem(self, value: Any) -> str | None:
        """Why ``value`` breaks the rule (a phrase to follow the key), or None."""
        if isinstance(value, str):
            return None if not self.choices or value in self.choices else _one_of(self.choices, value)
        if isinstance(value, list | tuple):
            if self.non_empty and not value:
                return "must not be empty"
            if any(_is_number(v) and not self._fits(v) for v in value):
                return f"must hold values {self.bounds()}, got {list(value)}"
            if self.increasing and any(not b > a for a, b in itertools.pairwise(value)):
                return f"must be increasing, got {list(value)}"
            return None
        if _is_number(value) and not self._fits(value):
            return f"must be {self.bounds()}, got {value!r}"
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _one_of(choices: Sequence[Any], value: Any) -> str:
    return f"must be one of {', '.join(map(repr, choices))}, got {value!r}"


FREE = Rule()  # any real number: guidance scales, log-normal means, seeds
AT_LEAST_1 = Rule(low=1)
NON_NEGATIVE = Rule(low=0)
POSITIVE = Rule(low=0, low_open=True)
UNIT = Rule(low=0, high=1)
TRIGFLOW_TIME = Rule(low=0, high=math.pi / 2, low_open=True)  # t in (0, pi/2]

# Field name (an exact name or an fnmatch pattern) -> rule; the first match wins, so exact names and narrow patterns
# come before the suffixes. Every numeric field of every recipe's config must match a row (tests/training/
# test_config.py walks them), so a new field is classified when it is added; FREE says so explicitly.
RULES: tuple[tuple[str, Rule], ...] = (
    # enum strings that are not typed as Literal
    ("mixed_precision", Rule(choices=("no", "fp16", "bf16"))),
    # free: any real number
    ("seed", FREE),
    ("guidance_interval", Rule(low=0, increasing=True)),  # (lo, hi] of the teacher's native time
    ("*guidance", FREE),  # guidance, anti_guidance (negative on purpose), teacher_guidance
    ("kappa*", FREE),  # SiD-LSG's long-short guidance scales kappa1..kappa4
    ("w_min", FREE),  # LCM's guidance range
    ("w_max", FREE),
    ("alpha", FREE),  # SiD's alpha
    ("*p_mean", FREE),  # log-normal means of log(sigma / sigma_data): negative is usual
    # TrigFlow times (rad)
    ("plan_mid", TRIGFLOW_TIME),
    ("plan_mids", TRIGFLOW_TIME),
    ("plan_t_max", TRIGFLOW_TIME),
    # counts and budgets
    ("*warmup_steps", NON_NEGATIVE),  # 0: no warm-up
    ("stage_steps", Rule(low=0, non_empty=True)),  # Hyper-SD's iterations per TSCD stage (0: the stage is skipped)
    ("reward_steps", NON_NEGATIVE),  # Hyper-SD's feedback stage (0: none)
    ("dmd_steps", NON_NEGATIVE),  # Hyper-SD's score-distillation stage (0: none)
    ("dmd_plans", Rule(low=1, non_empty=True)),  # Hyper-SD: the step counts of the samplers score distillation reads
    ("dmd_plan_rows", Rule(low=1)),  # Hyper-SD: rows per cycle of the batch for each dmd_plans entry (empty: one each)
    ("segments", Rule(low=1, non_empty=True)),  # Hyper-SD's k per TSCD stage
    ("adv_segments", NON_NEGATIVE),  # the adversarial term joins stages with k <= this (0: never)
    ("reward_late", UNIT),  # a fraction of the teacher's time range
    ("*_steps", Rule(low=1, non_empty=True)),  # max_steps, plan_steps, train_steps, fake_steps, teacher_steps, ...
    ("steps", AT_LEAST_1),
    ("*batch_size", AT_LEAST_1),
    ("grad_accum", AT_LEAST_1),
    ("*_every", AT_LEAST_1),  # checkpoint_every, adv_block_every
    ("keep_checkpoints", AT_LEAST_1),
    ("nan_patience", AT_LEAST_1),
    ("student_update_freq", AT_LEAST_1),
    ("num_*", AT_LEAST_1),  # num_ddim_timesteps, num_teacher_samples
    ("skip", AT_LEAST_1),
    ("w_embedding_dim", AT_LEAST_1),
    ("height", AT_LEAST_1),  # pixels of a text-to-image or -video teacher's samples
    ("width", AT_LEAST_1),
    ("max_sequence_length", AT_LEAST_1),
    ("dmd_start", NON_NEGATIVE),
    ("adv_frames", AT_LEAST_1),  # MCM's frames per clip for the frame discriminator
    ("boundary_index", AT_LEAST_1),  # DCM's expert boundary on its Euler grid
    ("temporal_stride", AT_LEAST_1),  # DCM's frame stride of the temporal-coherence loss
    ("lora_alpha", POSITIVE),
    ("*rank", NON_NEGATIVE),  # 0: no LoRA
    ("max_minutes", Rule(low=0, low_open=True, allow_inf=True)),  # inf: no time budget
    ("dist_timeout_s", Rule(low=0, low_open=True)),  # seconds a process waits for the others
    # optimizers
    ("lr", POSITIVE),
    ("dmd_lr", NON_NEGATIVE),  # Hyper-SD's score-distillation rate; 0: lr
    ("*_lr", POSITIVE),
    ("*betas", Rule(low=0, high=1, high_open=True, non_empty=True)),  # Adam: 0 <= beta < 1
    ("weight_decay", NON_NEGATIVE),
    ("grad_clip", Rule(low=0, low_open=True, allow_inf=True)),  # inf: no clipping
    # probabilities, decays and fractions of the teacher's time range
    ("*_decay", UNIT),  # ema_decay
    ("target_ema", UNIT),
    ("*_prob", UNIT),
    ("gamma", UNIT),  # re-noising share between steps
    ("plan_gammas", UNIT),  # Hyper-SD's gamma per plan step count (empty: gamma for all)
    ("pred_x0_portion", UNIT),  # MCM's share of batches on the student's own samples
    ("t_min", UNIT),
    ("t_max", UNIT),
    ("*_t_min", UNIT),
    ("*_t_max", UNIT),
    ("t_floor", Rule(low=0, high=1, high_open=True)),
    ("boundaries", Rule(low=0, high=1, low_open=True, high_open=True, non_empty=True)),
    # weights and positive scales
    ("*_weight", NON_NEGATIVE),  # 0 turns a term off
    ("*_weights", NON_NEGATIVE),  # relative draw weights (SiD's step_weights, rCM's plan_weights); empty: uniform
    ("loss_scale", POSITIVE),
    ("*sigma_data", POSITIVE),
    ("shift", POSITIVE),  # DCM's grid shift
    ("*_shift", POSITIVE),  # time shifts s: u -> s u / (1 + (s - 1) u) (rCM's dmd_time_shift)
    ("*p_std", POSITIVE),
    ("huber_c", POSITIVE),
    ("tangent_c", POSITIVE),
    ("fd_step", POSITIVE),
    ("snr_clip", POSITIVE),
    ("timestep_scaling", POSITIVE),
    ("time_max_freq", Rule(low=0, low_open=True, allow_inf=True)),  # inf: keep every channel
)


def rule_for(name: str) -> Rule | None:
    """The rule of a config field, by its own name (not its table); None when the table does not classify it."""
    return next((rule for pattern, rule in RULES if fnmatch.fnmatchcase(name, pattern)), None)


def _literal_choices(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(c for arg in typing.get_args(hint) for c in _literal_choices(arg))
    return ()


def validate_config(cfg: Any, where: str = "") -> None:
    """Check every field of dataclass ``cfg`` and of the dataclasses inside it: Literal fields against their values,
    numbers and lists of numbers against ``RULES``, and each ``x_min <= x_max`` pair. Raises a one-line FewstepError
    naming the key (``train.max_steps must be >= 1, got 0``)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            validate_config(value, f"{key}.")
            continue
        choices = _literal_choices(hints.get(f.name))
        if choices and value not in choices:
            raise FewstepError(f"{key} {_one_of(choices, value)}")
        rule = rule_for(f.name)
        problem = rule.problem(value) if rule is not None else None
        if problem is not None:
            raise FewstepError(f"{key} {problem}")
    for f in dataclasses.fields(cfg):
        if f.name.endswith("_min"):
            low, high = getattr(cfg, f.name), getattr(cfg, f.name[:-4] + "_max", None)
            if _is_number(low) and _is_number(high) and low > high:
                raise FewstepError(f"{where}{f.name} must be <= {where}{f.name[:-4]}_max, got {low!r} > {high!r}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Any, table: str = "") -> str:
    """A dataclass as TOML (None values are left out, as TOML has no null); ``resolve_config`` reads it back."""
    lines, nested = [], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            nested.append(to_toml(value, f"{table}{f.name}."))
        elif value is not None:
            lines.append(f"{f.name} = {_toml_value(value)}")
    header = [f"[{table[:-1]}]"] if table and lines else []
    return "\n".join([*header, *lines, *nested]) + ("\n" if lines or nested else "")
