"""Several processes: joining the launcher's process group, and PyTorch's own data-parallel engines applied in place.

``fewstep distill`` runs unchanged under ``torchrun`` / ``accelerate launch``; ``train.parallel`` picks the engine:

- "ddp": every network replicated, gradients averaged over the processes (``replicate``, PyTorch's DDP on the FSDP2
  runtime). Classic ``DistributedDataParallel`` is not used: its reducer expects each forward to be followed by one
  backward that reaches every parameter, while recipes call a network several times per step, under ``no_grad``,
  through ``torch.func.jvp``, and back-propagate one loss per network (measured: wrong gradients, and an abort at
  exit, on two processes).
- "fsdp": every network sharded with FSDP2 (``fully_shard`` per transformer/UNet block, then the network), the frozen
  teacher included, so the three copies DMD-style recipes hold fit; mixed precision through its
  ``MixedPrecisionPolicy``.

Both change modules in place (ARCHITECTURE.md), so the networks a recipe holds stay the ones it calls. The backend
is gloo on CPU and NCCL on CUDA. accelerate is not asked to shard: it never turns FSDP on for CPU processes
(../shared/ENVIRONMENT.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import FewstepError

Parallel = Literal["none", "ddp", "fsdp"]

# Child lists whose items are a backbone's blocks: each item becomes its own FSDP2 unit (all-gathered just before it
# runs, freed after), the outermost such lists only (a UNet's down_blocks hold transformer_blocks of their own).
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "down_blocks", "up_blocks")


def launched_world() -> int:
    """How many processes the launcher started (its WORLD_SIZE; 1 when there is none)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise FewstepError(f"WORLD_SIZE={text!r} is not a number of processes") from None


@dataclass
class Processes:
    """This process's place among the processes of a run (one process: rank 0 of 1, no process group)."""

    mode: Parallel = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mesh: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    managed: list[nn.Module] = field(default_factory=list)  # the units the engine changed, innermost first

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, mode: Parallel, timeout_s: float = 600.0) -> Processes:
        """Join the process group the launcher set up (env:// rendezvous), or run alone when there is none.

        One-line errors, before anything is written: processes launched with ``train.parallel = "none"``, a
        rendezvous that does not complete within ``timeout_s``, and a group whose size is not the launcher's."""
        import torch.distributed as dist

        world = launched_world()
        if world <= 1:
            return cls(mode=mode)
        if mode == "none":
            raise FewstepError(
                f"started as {world} processes but train.parallel is 'none': pass --set train.parallel=ddp (or fsdp)"
            )
        cuda = torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            try:
                dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
            except Exception as err:  # store timeouts, refused connections, bad addresses: many types
                raise FewstepError(
                    f"could not join the {world}-process group within {timeout_s:g} s ({first_line(err)}); "
                    "start every process with the same torchrun / accelerate launch command"
                ) from None
        if dist.get_world_size() != world:
            raise FewstepError(f"the process group has {dist.get_world_size()} processes, the launcher said {world}")
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
        return cls(mode=mode, rank=dist.get_rank(), world=world, local_rank=local_rank, mesh=mesh, device=device)

    # -----------------------------------------------------------------------------------------------------------
    # Collectives the Trainer needs

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the processes (one all-reduce)."""
        if not self.active or not values:
            return values
        import torch.distributed as dist

        stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(stacked)
        return {k: float(v) / self.world for k, v in zip(values, stacked.tolist(), strict=True)}

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (so that every process takes the same branch)."""
        if not self.active:
            return flag
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_ over parameters the engine manages: the norm of the whole gradient from
        each process's part of it, with one all-reduce. (torch's own issues one collective per parameter that has a
        gradient, and a parameter whose shard is empty on one process has none there: the processes fall out of
        step.) Returns the norm before clipping."""
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        square = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in local:
            square += g.double().pow(2).sum()
        if self.mode == "fsdp" and self.active:  # shards: the squares add up over processes; replicas already agree
            dist.all_reduce(square)
        norm = float(square.sqrt())
        coef = min(max_norm / (norm + 1e-6), 1.0)
        if coef < 1.0 and math.isfinite(norm):
            for g in grads:  # the gradients themselves (a DTensor's to_local() need not share their storage)
                g.mul_(coef)
        return norm

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def finish(self) -> None:
        """Leave the process group (after a last barrier)."""
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)  # accelerate remembers the group otherwise

    # -----------------------------------------------------------------------------------------------------------
    # The engine

    def apply(self, networks: Iterable[nn.Module], mixed_precision: str = "no") -> None:
        """Replicate ("ddp") or shard ("fsdp") every network in place, innermost first."""
        if not self.active:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if mixed_precision == "fp16":
            raise FewstepError("train.parallel runs mixed precision as bf16 only: set train.mixed_precision = 'bf16'")
        dtype = torch.bfloat16 if mixed_precision == "bf16" else None
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        for unit in sorted(units(networks), key=lambda m: len(list(m.modules()))):
            if not any(_plain(p) for p in unit.parameters()):
                continue  # already managed (a network listed twice, or inside one done before)
            if self.mode == "fsdp":
                for inner in [*reached_into(unit), *outer_blocks(unit)]:
                    if any(_plain(p) for p in inner.parameters()):
                        fully_shard(inner, mesh=self.mesh, mp_policy=policy)
                fully_shard(unit, mesh=self.mesh, mp_policy=policy)
            else:
                from torch.distributed._composable.replicate_with_fsdp import replicate

                replicate(unit, mesh=self.mesh, mp_policy=policy)
            self.managed.append(unit)

    def reshard(self) -> None:
        """Put every managed network back on its sharded (or replicated) parameters. A network run only without
        gradient (a target copy, the teacher) keeps its gathered parameters after the forward; the optimizers, the
        EMAs and the recipes' own updates must act on the parameters the engine holds, so the Trainer calls this
        after the backward passes of each step."""
        for unit in self.managed:
            reshard = getattr(unit, "reshard", None)
            if reshard is not None:
                reshard()


LAUNCHER_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def alone() -> Iterator[None]:
    """Within the block this process does not see its launcher (accelerate would otherwise join the finished group
    again): for the one-process export after a run on several."""
    saved = {k: os.environ.pop(k) for k in LAUNCHER_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def units(networks: Iterable[nn.Module]) -> list[nn.Module]:
    """The modules that are called (containers opened: ModuleDict / ModuleList have no forward), each once."""
    found: dict[int, nn.Module] = {}

    def visit(module: nn.Module) -> None:
        if isinstance(module, nn.ModuleDict | nn.ModuleList):
            for child in module.children():
                visit(child)
        elif any(True for _ in module.parameters()):
            found.setdefault(id(module), module)

    for net in networks:
        visit(net)
    return list(found.values())


def _plain(p: Tensor) -> bool:
    """A parameter no engine manages yet (the engines turn them into DTensors)."""
    return getattr(p, "placements", None) is None


def reached_into(module: nn.Module) -> list[nn.Module]:
    """The submodules its backbone's forward calls out of block order (``Backbone.reached_into``)."""
    from ..teacher import BACKBONES

    backbone = BACKBONES.get(type(module).__name__)
    names = backbone.reached_into if backbone is not None else ()
    return [module.get_submodule(n) for n in names if _has_submodule(module, n)]


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def outer_blocks(module: nn.Module) -> list[nn.Module]:
    """Items of the outermost ``BLOCK_LISTS`` children of ``module`` (and a UNet's mid_block)."""
    out: list[nn.Module] = []
    taken: list[str] = []
    for name, child in module.named_modules():
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(child, nn.ModuleList) and leaf in BLOCK_LISTS:
            out.extend(child)
            taken.append(name)
        elif leaf == "mid_block" and child is not None:
            out.append(child)
            taken.append(name)
    return out


def recipe_networks(recipe: Any) -> list[nn.Module]:
    """Every network a recipe holds (students, critics, frozen teachers, target copies), found by walking its
    attributes: a Denoiser counts as its ``model``; composed recipes and helper objects of fewstep are opened."""
    from ..teacher import Denoiser

    found: dict[int, nn.Module] = {}
    seen: set[int] = set()

    def walk(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Denoiser):
            walk(obj.model)
        elif isinstance(obj, nn.Module):
            found.setdefault(id(obj), obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)
        elif type(obj).__module__.startswith("fewstep.") and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v)

    walk(recipe)
    # a module that is part of another found one (a discriminator's handle on teacher blocks) is that one's business
    inside = {id(sub) for m in found.values() for sub in m.modules() if sub is not m}
    return [m for m in found.values() if id(m) not in inside]


def slice_batch(batch: Any, index: int, count: int) -> Any:
    """Slice ``index`` of ``count`` of a global batch: every tensor whose first dimension is the batch size is cut
    (x0, per-sample conditions), the rest (a shared unconditional row, settings) is kept whole."""
    if batch is None or count == 1:
        return batch
    from ..recipes.base import Batch

    if not isinstance(batch, Batch):
        raise FewstepError(f"several processes need Batch objects from the data, got {type(batch).__name__}")
    n = len(batch.x0) if batch.x0 is not None else _rows(batch.cond)
    if n is None or n % count:
        raise FewstepError(f"the global batch of {n} does not split into {count} equal slices: set train.batch_size")
    b = n // count
    return batch.rows(slice(index * b, (index + 1) * b), n)


def _rows(cond: dict[str, Any]) -> int | None:
    for value in _tensors(cond):
        return int(value.shape[0])
    return None


def _tensors(tree: Any) -> Iterator[Tensor]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)


def lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another process is gone (it crashed, or its machine did)."""
    text = str(err)
    return any(s in text for s in ("Connection reset", "Connection closed", "Broken pipe", "timed out", "NCCL error"))


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
