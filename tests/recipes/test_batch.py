"""``Batch``: cutting and dealing a batch's rows."""

from __future__ import annotations

import pytest
import torch

from fewstep.errors import FewstepError
from fewstep.recipes.base import Batch


def _batch(n: int) -> Batch:
    labels = torch.arange(n)
    return Batch(
        torch.arange(n, dtype=torch.float32).view(n, 1), {"class_labels": labels}, {"class_labels": labels[:1]}
    )


@pytest.mark.parametrize(
    ("weights", "expected"),
    [((1,), [[0, 1, 2, 3, 4, 5, 6]]), ((1, 1, 1), [[0, 3, 6], [1, 4], [2, 5]]), ((2, 1), [[0, 1, 3, 4, 6], [2, 5]])],
)
def test_interleaved_deals_every_row_once_round_the_cycle(weights: tuple[int, ...], expected: list[list[int]]) -> None:
    batch = _batch(7)
    parts = batch.interleaved(weights, "test")
    assert [rows.tolist() for rows, _ in parts] == expected
    for rows, part in parts:
        assert part.x0 is not None
        assert part.x0.flatten().tolist() == rows.tolist() == part.cond["class_labels"].tolist()
        assert part.uncond["class_labels"].tolist() == [0]  # a shared row is kept whole
    assert sorted(i for rows, _ in parts for i in rows.tolist()) == list(range(7))


def test_interleaved_equal_weights_are_the_strided_slices() -> None:
    batch = _batch(8)
    for j, (_, part) in enumerate(batch.interleaved((1, 1, 1, 1), "test")):
        assert part.x0 is not None and batch.x0 is not None
        assert torch.equal(part.x0, batch.x0[j::4])


def test_a_batch_shorter_than_the_cycle_is_a_one_line_error() -> None:
    with pytest.raises(FewstepError, match="recipe x needs at least 3 samples per process, got 2"):
        _batch(2).interleaved((2, 1), "recipe x")
