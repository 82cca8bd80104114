"""A mixture of experts over noise levels (Phased DMD): K copies of one backbone, expert k serving the k-th phase.

``TimestepExperts`` sits in a pipeline's backbone slot (``pipe.unet`` or ``pipe.transformer``) and picks the expert by
the ``timestep`` the pipeline passes, so the pipeline's ordinary sampling loop uses the right expert at every step.
Phases are given by K - 1 strictly decreasing ``boundaries`` in that same model-timestep unit (0..1000 for most
backbones, sigma in [0, 1] for Flux, whose pipeline passes timestep / 1000):

    expert 0:  b[0] < t                (noisiest)
    expert k:  b[k] < t <= b[k-1]
    expert K-1:       t <= b[K-2]

A timestep equal to a boundary goes to the less noisy expert. Timesteps are compared with the boundaries in the
timestep's floating dtype (at least float32), so a boundary equal to a scheduler timestep compares equal as the
scheduler stores it.

Loading: ``save_pretrained`` records the component as ``["fewstep.export.experts", "TimestepExperts"]``.
diffusers resolves such a library only from ``sys.modules`` (it never imports modules a folder names), so
``import fewstep.export.experts`` (or ``from fewstep.export.experts import TimestepExperts``) before
``DiffusionPipeline.from_pretrained(folder)``; ``load_pipeline`` does. Pipelines that annotate their backbone's class
(StableDiffusion3Pipeline, FluxPipeline) log an "Expected types for transformer" warning on load; the wrapper works
in their loops all the same.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, cast

import diffusers
import torch
from diffusers import ConfigMixin, ModelMixin  # ModelMixin here is also how diffusers finds our load method
from diffusers.configuration_utils import FrozenDict, register_to_config
from torch import Tensor, nn

from ..errors import FewstepError
from ..teacher import backbone_for


class TimestepExperts(ModelMixin, ConfigMixin):  # type: ignore[misc]  # diffusers' config_name clash
    """K backbones of one diffusers class, switched by timestep (see the module docstring for the phases).

    Args:
        expert_class: the experts' diffusers class name, e.g. "SD3Transformer2DModel".
        expert_config: their config (``dict(expert.config)``); ``from_pretrained`` builds the experts from it.
        boundaries: K - 1 strictly decreasing model timesteps between the phases.
        experts: the K modules to wrap (not copied); built from config when None (not saved in the config).

    ``config`` reads through to the experts' config (``config.in_channels``, ``config.patch_size``, ...), as pipelines
    expect of their backbone; public non-method attributes the wrapper lacks (``add_embedding``, ...) read from
    expert 0.
    """

    ignore_for_config = ["experts"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        expert_class: str,
        expert_config: Mapping[str, Any],
        boundaries: Sequence[float] = (),
        experts: Sequence[nn.Module] | None = None,
    ):
        super().__init__()
        bounds = [float(b) for b in boundaries]
        if any(a <= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise FewstepError(f"expert boundaries must be strictly decreasing, got {bounds}")
        cls = _model_class(expert_class)
        if experts is None:
            experts = [cls.from_config(dict(expert_config)) for _ in range(len(bounds) + 1)]
        if len(experts) != len(bounds) + 1:
            raise FewstepError(f"{len(bounds)} boundaries need {len(bounds) + 1} experts, got {len(experts)}")
        if any(type(e) is not cls for e in experts):
            names = sorted({type(e).__name__ for e in experts})
            raise FewstepError(f"all experts must be {expert_class}, got {names}")
        self.experts = nn.ModuleList(experts)
        self.register_to_config(expert_config=_public(expert_config), boundaries=bounds)
        self._signature = inspect.signature(self.experts[0].forward)
        self._batch_arg = next(iter(self._signature.parameters))  # sample / hidden_states
        try:
            self._shared: tuple[str, ...] = backbone_for(self.experts[0]).shared  # Flux's img_ids, txt_ids
        except FewstepError:  # a diffusers class fewstep has no adapter for: nothing known to be batch-free
            self._shared = ()
        # dtype detection and layerwise casting read these from the model itself; the names match experts' too
        self._keep_in_fp32_modules = cls._keep_in_fp32_modules
        self._skip_layerwise_casting_patterns = cls._skip_layerwise_casting_patterns

    @classmethod
    def from_experts(cls, experts: Sequence[nn.Module], boundaries: Sequence[float]) -> TimestepExperts:
        """Wrap trained backbones (one class and config; shared, not copied); ``boundaries`` as in ``__init__``."""
        if not experts:
            raise FewstepError("TimestepExperts needs at least one expert")
        configs = [_public(cast(ModelMixin, e).config) for e in experts]
        name = type(experts[0]).__name__
        wrapper = cls(expert_class=name, expert_config=configs[0], boundaries=boundaries, experts=experts)
        if any(c != configs[0] for c in configs[1:]):
            raise FewstepError("all experts must share one config")
        return wrapper

    @property
    def boundaries(self) -> tuple[float, ...]:
        return tuple(self._internal_dict["boundaries"])

    @property
    def config(self) -> FrozenDict:
        """The experts' config with this wrapper's own entries (expert_class, expert_config, boundaries) on top."""
        experts = self._modules.get("experts")
        if experts is None:  # during __init__
            return self._internal_dict
        return FrozenDict({**experts[0].config, **self._internal_dict})

    def __getattr__(self, name: str) -> Any:  # pipelines read e.g. unet.add_embedding.linear_1.in_features (SDXL)
        try:
            return super().__getattr__(name)
        except AttributeError:
            experts = self.__dict__.get("_modules", {}).get("experts")
            if experts is None or name.startswith("_"):  # hooks (_hf_hook, _diffusers_hook) stay per module
                raise
        value = getattr(experts[0], name)
        if inspect.ismethod(value):  # calling it on expert 0 alone would silently skip the others
            raise AttributeError(f"TimestepExperts has no method {name!r}: call it on each of .experts")
        return value

    def phase(self, timestep: Tensor | float) -> Tensor:
        """Index of the expert serving each timestep: a long tensor of ``timestep``'s shape."""
        t = torch.as_tensor(timestep)
        work = torch.promote_types(t.dtype, torch.float32)
        bounds = torch.tensor(self.boundaries, dtype=work, device=t.device)
        return (t.to(work).unsqueeze(-1) <= bounds).sum(-1)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The expert's forward (same arguments, same output type), by phase of ``timestep``.

        A batch whose timesteps (B,) span several phases runs each expert on its samples: every tensor argument with
        B rows (also inside dicts, lists and tuples) is sliced, other arguments pass unchanged, and the outputs are
        put back in batch order. Timesteps of shape (B, N) (per-token, Wan 2.2) go by their maximum per sample.
        """
        bound = self._signature.bind(*args, **kwargs)
        timestep = bound.arguments.get("timestep")
        if timestep is None:
            raise FewstepError("TimestepExperts needs the timestep to choose an expert")
        t = torch.as_tensor(timestep)
        if t.numel() == 1:
            return self.experts[int(self.phase(t.reshape(())))](*args, **kwargs)
        batch = bound.arguments[self._batch_arg].shape[0]
        if t.shape[0] != batch:
            raise FewstepError(f"timestep has {t.shape[0]} rows for a batch of {batch}")
        phases = self.phase(t.detach().reshape(batch, -1).amax(1))
        present = phases.unique().tolist()
        if len(present) == 1:
            return self.experts[present[0]](*args, **kwargs)
        rows, parts = [], []
        for k in present:
            idx = (phases == k).nonzero().squeeze(1)
            sub = {name: _take(value, idx, batch, name in self._shared) for name, value in bound.arguments.items()}
            part = inspect.BoundArguments(self._signature, OrderedDict(sub))
            rows.append(idx)
            parts.append(self.experts[k](*part.args, **part.kwargs))
        return _gather(parts, torch.cat(rows).argsort())

    @contextmanager
    def cache_context(self, name: str, **kwargs: Any) -> Iterator[None]:
        """diffusers' cache context (FluxPipeline enters it every step), on every expert."""
        with ExitStack() as stack:
            for expert in self.experts:
                enter = getattr(expert, "cache_context", None)
                if enter is not None:
                    stack.enter_context(enter(name, **kwargs))
            yield


def _model_class(name: str) -> Any:
    """The diffusers model class ``name`` (looked up in diffusers only: a config never names a module to import)."""
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise FewstepError(f"experts must be diffusers models; diffusers has no model class {name!r}")
    return cls


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    """A model config without diffusers' bookkeeping (_class_name, _diffusers_version, _name_or_path, ...)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _take(value: Any, idx: Tensor, batch: int, shared: bool) -> Any:
    """Rows ``idx`` of every batch-shaped tensor in ``value`` (nested in mappings, lists and tuples)."""
    if shared:
        return value
    if isinstance(value, Tensor):
        return value[idx.to(value.device)] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, Mapping):
        return {k: _take(v, idx, batch, False) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [_take(v, idx, batch, False) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _gather(parts: list[Any], order: Tensor) -> Any:
    """Concatenate the experts' outputs (same structure each) and restore batch order: rows ``order`` of the concat."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)[order.to(first.device)]
    if isinstance(first, tuple):
        return tuple(_gather([p[i] for p in parts], order) for i in range(len(first)))
    if dataclasses.is_dataclass(first):  # diffusers' output objects (.sample)
        fields = {f.name: _gather([getattr(p, f.name) for p in parts], order) for f in dataclasses.fields(first)}
        return cast(Any, type(first))(**fields)
    return first  # None and other non-batch values


# pipelines with a stock two-expert loop: (slot of the noisier expert, slot of the other, the setting that splits them)
TWO_EXPERT_PIPELINES = {"WanPipeline": ("transformer", "transformer_2", "boundary_ratio")}


def stock_experts(pipe: Any, model: nn.Module) -> dict[str, Any] | None:
    """Components and settings that let ``pipe``'s own loop switch two experts as ``model`` (TimestepExperts) does,
    or None where the pipeline has no such loop (then the TimestepExperts backbone is exported).

    WanPipeline (Wan 2.2) runs ``transformer`` at timesteps t >= boundary_ratio * num_train_timesteps and
    ``transformer_2`` below. TimestepExperts gives a timestep equal to its boundary b to the less noisy expert, so
    the ratio puts the switch on the next float32 above b (the pipeline compares float32 timesteps with it).
    """
    import numpy as np

    slots = TWO_EXPERT_PIPELINES.get(type(pipe).__name__)
    if slots is None or not isinstance(model, TimestepExperts) or len(model.experts) != 2:
        return None
    high, low, setting = slots
    total = int(pipe.scheduler.config.num_train_timesteps)
    above = np.nextafter(np.float32(model.boundaries[0]), np.float32(np.inf))
    ratio = float(above) / total
    if np.float32(ratio * total) != above:  # the pipeline's product must land on the same float32
        ratio = float(np.nextafter(ratio, np.inf))
    return {high: model.experts[0], low: model.experts[1], setting: ratio}
