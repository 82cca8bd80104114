"""Measuring pieces: NFE hook, peak memory, latency timers (CPU here; the CUDA path on a GPU)."""

from __future__ import annotations

import pytest
import torch

from fewstep.bench.measure import PeakMemory, count_nfe, time_call


def test_peak_memory_sees_a_large_allocation() -> None:
    with PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(64, 2**20 // 4)  # 64 MB, touched
        float(block.sum())
        del block
    assert mem.peak_mb > 32


def test_time_call_counts_repeats() -> None:
    calls = []
    times = time_call(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_count_nfe_reads_keyword_inputs() -> None:
    class Net(torch.nn.Module):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return hidden_states

    net = Net()
    with count_nfe(net, batch=3) as nfe:
        net(hidden_states=torch.zeros(6, 2))
        net(torch.zeros(3, 2))
    assert nfe[0] == 3


@pytest.mark.gpu
def test_cuda_events_and_allocator_peak() -> None:
    device = torch.device("cuda")
    with PeakMemory(device) as mem:
        x = torch.ones(2**24, device=device)  # 64 MB
        del x
    assert mem.peak_mb >= 60
    times = time_call(lambda: torch.ones(2**20, device=device).sum(), device, warmup=1, repeats=3)
    assert len(times) == 3 and all(t > 0 for t in times)
