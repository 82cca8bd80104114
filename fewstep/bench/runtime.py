"""How a benched pipeline runs, as people run it for speed: the dtype it is loaded in, its attention backend (PyTorch
SDPA, diffusers' default, or xformers' memory-efficient attention from the ``gpu`` extra) and ``torch.compile`` of its
denoiser. Each choice is checked before any model loads; one this machine cannot run fails on one line.

Checked on CPU (torch 2.14, diffusers 0.42, 2 cores): fp16 and bf16 both run on the digits DiT and on a tiny SD UNet
(diffusers warns that fp16 "cannot run" on a CPU; it does, so that warning is silenced). torch.compile works through
inductor, which needs a C++ compiler: about 10-20 s per input shape for the digits DiT. xformers needs CUDA.

Parsing imports nothing heavy: the CLI reads ``ATTENTION`` and ``DTYPES`` from here, so torch loads inside functions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import FewstepError

if TYPE_CHECKING:
    import torch

ATTENTION = ("sdpa", "xformers")
DTYPES = ("fp32", "fp16", "bf16")
DEFAULTS: dict[str, Any] = {"attention": "sdpa", "compile": False, "dtype": "fp32"}
XFORMERS_NEEDS = "xformers attention needs CUDA and the gpu extra: pip install 'fewstep[gpu]'"


def validate_runtime(attention: str, compile: bool, dtype: str) -> None:
    """Bad names, on one line."""
    if attention not in ATTENTION:
        raise FewstepError(f"--attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
    if dtype not in DTYPES:
        raise FewstepError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not isinstance(compile, bool):
        raise FewstepError(f"compile must be True or False, got {compile!r}")


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def check_runnable(attention: str, compile: bool, device: str) -> None:
    """Choices this machine cannot run, on one line, before any model loads: xformers without the package or without
    a CUDA device, and torch.compile where inductor cannot build code (no C++ compiler on a CPU, no Triton on a GPU),
    found by compiling a one-line probe on ``device`` (a few seconds, then cached by inductor)."""
    import importlib.util

    import torch

    if attention == "xformers":
        on_cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        if not on_cuda or importlib.util.find_spec("xformers") is None:
            raise FewstepError(XFORMERS_NEEDS)
    if compile:
        try:
            torch.compile(_probe, dynamic=False)(torch.zeros(4, device=device))
        except Exception as err:
            raise FewstepError(f"torch.compile cannot run on {device}: {_first_line(err)}") from None


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x.sin() * 2 + 1


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def quiet_loading(dtype: str, device: str) -> Iterator[None]:
    """Loading in ``dtype`` without two false alarms: diffusers' FutureWarning on the ``torch_dtype`` argument that
    ``loading.load_pipeline`` passes, and its warning that fp16 pipelines cannot run on a CPU (torch 2.14 does)."""
    import warnings

    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    if dtype == "fp16" and str(device).startswith("cpu"):
        diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def apply_runtime(pipe: Any, attention: str, compile: bool) -> None:
    """Switch ``pipe`` to xformers attention and compile its denoiser in place (the pipeline loaded in its dtype).

    "sdpa" leaves diffusers' default, PyTorch's scaled_dot_product_attention. ``Module.compile`` keeps the module's
    type, config and hooks (the NFE counter), so the pipeline and the bench see the same object. ``dynamic=False``
    specializes a graph to each input shape, as for a user who calls at one batch size: the bench compiles once per
    shape (quality batches, the latency batch, with and without CFG) and times the latency batch only after a warm-up
    call compiled it."""
    from ..teacher import backbone_of

    if attention == "xformers":
        try:
            pipe.enable_xformers_memory_efficient_attention()
        except Exception as err:  # a processor xformers has no version of, or an xformers build without kernels
            raise FewstepError(f"xformers attention failed for {type(pipe).__name__}: {_first_line(err)}") from None
    if compile:
        backbone_of(pipe).compile(dynamic=False)


def load_pipelines(sources: Sequence[str], device: str, attention: str, compile: bool, dtype: str) -> list[Any]:
    """Each source's pipeline in ``dtype`` on ``device``, with its attention backend and compiled denoiser; what this
    machine cannot run fails first, before anything loads."""
    from ..loading import load_pipeline

    check_runnable(attention, compile, device)
    with quiet_loading(dtype, device):
        pipes = [load_pipeline(source, device=device, dtype=torch_dtype(dtype)) for source in sources]
    for pipe in pipes:
        apply_runtime(pipe, attention, compile)
    return pipes


def runtime_of(row: Mapping[str, Any]) -> tuple[str, bool, str]:
    """(attention, compile, dtype) of a report row; rows from before these columns ran with the defaults."""
    return (
        row.get("attention", DEFAULTS["attention"]),
        bool(row.get("compile", DEFAULTS["compile"])),
        row.get("dtype", DEFAULTS["dtype"]),
    )


def runtime_tag(row: Mapping[str, Any]) -> str:
    """The settings of a row that differ from the defaults, e.g. "bf16, xformers, compiled"; "" for none."""
    attention, compiled, dtype = runtime_of(row)
    parts = [dtype] if dtype != DEFAULTS["dtype"] else []
    parts += [attention] if attention != DEFAULTS["attention"] else []
    parts += ["compiled"] if compiled else []
    return ", ".join(parts)
