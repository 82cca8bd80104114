"""The generator's draws: uniform as the references draw (torch.randint, unchanged), or in proportion to weights."""

from __future__ import annotations

import pytest
import torch

from fewstep.objectives.generator import draw_index


def test_without_weights_the_draw_is_torch_randint() -> None:
    torch.manual_seed(4)
    drawn = [draw_index(5) for _ in range(20)]
    torch.manual_seed(4)
    assert drawn == [int(torch.randint(5, ())) for _ in range(20)]


def test_weighted_draws_follow_the_weights() -> None:
    """Weights 3 : 1 : 0: index 0 three times as often as 1 (share 0.75; 4,000 draws put 4 sigma at 0.027), 2 never."""
    torch.manual_seed(0)
    counts = torch.bincount(torch.tensor([draw_index(3, (3.0, 1.0, 0.0)) for _ in range(4000)]), minlength=3)
    assert counts[2] == 0
    assert abs(float(counts[0]) / 4000 - 0.75) < 0.027


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.0, 0.0, 0.0), (1.0, -1.0, 1.0)])
def test_bad_weights_are_refused(weights: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="weights"):
        draw_index(3, weights)
