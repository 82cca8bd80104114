"""Loading models by name: ``digits`` (the embedded teacher), a local diffusers folder or a hub id, as a pipeline or
as a Denoiser over its backbone.

This sits above ``export/`` and ``worlds/``: diffusers resolves a component's library only from ``sys.modules``, so
loading imports fewstep's own component classes (the digits pipeline, FewStepScheduler, TimestepExperts) first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import FewstepError
from .teacher import Denoiser, backbone_for, backbone_of
from .worlds import EMBEDDED


def embedded_path(name: str = "teacher", world: str = "digits") -> Any:
    """Folder of a shipped asset ("teacher" or "evaluator") of an embedded world ("digits" or "video")."""
    from importlib.resources import files

    return files("fewstep") / "assets" / world / name


def model_label(source: str) -> str:
    """A short name for a model: 'digits-teacher' or 'video-teacher' for an embedded teacher, else the folder or hub
    name."""
    return f"{source}-teacher" if source in EMBEDDED else Path(source.rstrip("/")).name or source


def resolve_source(source: str) -> str:
    """``digits`` / ``video`` -> the embedded teacher's folder; a local folder is checked to be a diffusers
    pipeline, or a LoRA student whose base resolves."""
    import os

    if source in EMBEDDED:
        return str(embedded_path("teacher", world=source))
    if os.path.isdir(source):
        base = lora_base(source)
        if base is not None:  # a LoRA student: its base must resolve
            resolve_source(base)
            return source
        if not os.path.isfile(os.path.join(source, "model_index.json")):
            raise FewstepError(f"{source} is not a diffusers pipeline folder (no model_index.json)")
        return source
    if os.path.exists(source):
        raise FewstepError(f"{source} is a file, not a diffusers pipeline folder")
    looks_like_hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if looks_like_hub_id and os.path.isdir(source.split("/")[0]):  # models/teacher with a local models/
        looks_like_hub_id = False
    if not looks_like_hub_id:
        raise FewstepError(f"{source} does not exist (expected a diffusers folder, a hub id, 'digits' or 'video')")
    return source


# written into a LoRA student's folder by ``fewstep distill``: {"base": the teacher it adapts}, so that every command
# that takes a model (bench, sample) takes the LoRA folder too
LORA_BASE = "fewstep_base.json"


def lora_base(source: str) -> str | None:
    """The base pipeline a LoRA student folder adapts, or None when ``source`` is no such folder."""
    import json

    path = Path(source) / LORA_BASE
    return str(json.loads(path.read_text())["base"]) if path.is_file() else None


def load_pipeline(source: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """A diffusers pipeline from ``digits``, a local folder or a hub id (when online), with progress bars off; a
    LoRA student's folder gives its base pipeline with the adapter merged and the student's scheduler."""
    base = lora_base(source)
    if base is not None:
        pipe = with_lora(load_pipeline(base, dtype=dtype), Path(source))
        return pipe if device is None else load_pipeline_to(pipe, device)
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from . import experts as _old_experts  # noqa: F401  (folders from before the move)

    # diffusers loads components only from libraries already imported: make fewstep's own classes known first
    from .export import experts as _experts  # noqa: F401  (Phased DMD's per-phase experts)
    from .export import scheduling_fewstep as _scheduler  # noqa: F401
    from .worlds.digits import pipeline as _digits  # noqa: F401  (also registers DigitsPipeline with diffusers)
    from .worlds.video import pipeline as _video  # noqa: F401  (and VideoDigitsPipeline)

    path = resolve_source(source)
    kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" on every load is noise
    try:
        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    except FewstepError:
        raise
    except Exception as err:  # diffusers raises many types; the user needs the reason on one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FewstepError(f"could not load pipeline {source}: {reason}") from None
    backbone_for(backbone_of(pipe))  # an unsupported network fails here, on one line, for every command
    if device is not None:
        load_pipeline_to(pipe, device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline_to(pipe: Any, device: str | torch.device) -> Any:
    """``pipe`` moved to ``device``, or a one-line error naming why it cannot be."""
    try:
        pipe.to(device)
    except (RuntimeError, AssertionError, ValueError) as err:  # no CUDA, unknown device string
        raise FewstepError(f"cannot use device {device!r}: {str(err).splitlines()[0]}") from None
    return pipe


def with_lora(pipe: Any, folder: Path) -> Any:
    """``pipe`` with the LoRA student in ``folder`` merged into its backbone (diffusers' LoRA file through
    ``load_lora_weights`` and ``fuse_lora``, or peft's adapter folder through ``merge_and_unload``) and the student's
    scheduler from ``folder/scheduler``."""
    import json

    import diffusers

    from .export import scheduling_fewstep
    from .teacher import backbone_slot

    slot = backbone_slot(pipe)
    try:
        if (folder / "adapter_config.json").is_file():
            from peft import PeftModel

            setattr(pipe, slot, PeftModel.from_pretrained(getattr(pipe, slot), str(folder)).merge_and_unload())
        else:
            pipe.load_lora_weights(str(folder))
            pipe.fuse_lora()
            pipe.unload_lora_weights()  # the fused weights stay
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        name = str(config["_class_name"])
        cls = getattr(scheduling_fewstep, name, None) or getattr(diffusers, name)
        pipe.scheduler = cls.from_config(config)
    except (OSError, ValueError, KeyError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FewstepError(f"could not load the LoRA student {folder}: {reason}") from None
    return pipe


def load_denoiser(source: str, device: str | torch.device | None = None) -> tuple[Denoiser, Any]:
    """(Denoiser over the pipeline's backbone, the pipeline) for ``source``."""
    pipe = load_pipeline(source, device=device)
    return Denoiser.from_pipeline(pipe), pipe
