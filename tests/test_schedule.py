"""Per-step schedules: pure functions of the step (what makes resume and multi-GPU runs agree)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from speedrun.model import BLOCK_SIZE
from speedrun.schedule import lr_multiplier, muon_momentum, window_blocks


def test_lr_stable_then_linear_to_final_frac():
    steps, cooldown, final = 1000, 0.4, 0.1
    lr = np.array([lr_multiplier(s, steps, cooldown, final) for s in range(steps + 1)])
    assert np.all(lr[:601] == 1.0)                       # stable for the first 60%
    assert lr[-1] == pytest.approx(final)                # ends at final_frac of the peak
    assert lr[800] == pytest.approx((1 + final) / 2)     # half-way through the cooldown
    np.testing.assert_allclose(np.diff(lr[600:]), -(1 - final) / 400, rtol=1e-6)  # linear
    assert np.all(np.diff(lr) <= 0)


@pytest.mark.parametrize("cooldown, final, expected_last", [(0.0, 0.1, 1.0), (1.0, 0.0, 0.0),
                                                           (0.5, 1.0, 1.0)])
def test_lr_edge_settings(cooldown, final, expected_last):
    lr = [lr_multiplier(s, 10, cooldown, final) for s in range(11)]
    assert lr[0] == 1.0 and lr[-1] == pytest.approx(expected_last)
    assert all(0.0 <= v <= 1.0 for v in lr)
    if cooldown == 1.0:  # decays from the first step
        np.testing.assert_allclose(lr, np.linspace(1, 0, 11), atol=1e-12)


def test_window_grows_monotonically_in_whole_blocks():
    steps, start, end = 1400, 256, 1792
    wb = [window_blocks(s, steps, start, end) for s in range(steps + 1)]
    assert all(isinstance(w, int) for w in wb)
    assert wb[0] == start // BLOCK_SIZE and wb[-1] == end // BLOCK_SIZE
    assert all(0 <= b - a <= 1 for a, b in zip(wb, wb[1:]))          # monotone, no jumps
    assert set(wb) == set(range(start // BLOCK_SIZE, end // BLOCK_SIZE + 1))
    for s, w in enumerate(wb):  # the linear window in tokens, rounded up to a whole block
        tokens = start + (end - start) * s / steps
        assert w == math.ceil(tokens / BLOCK_SIZE)
    assert window_blocks(700, steps, start, end) == 8                # 1024 tokens half-way
    assert window_blocks(5000, steps, start, end) == 14              # clamped past the end
    assert window_blocks(-3, steps, start, end) == 2


def test_constant_window():
    assert {window_blocks(s, 50, 256, 256) for s in range(51)} == {2}


def test_muon_momentum_warmup():
    assert muon_momentum(0, 300, 0.85, 0.95) == pytest.approx(0.85)
    assert muon_momentum(150, 300, 0.85, 0.95) == pytest.approx(0.90)
    assert muon_momentum(300, 300, 0.85, 0.95) == pytest.approx(0.95)
    assert muon_momentum(1000, 300, 0.85, 0.95) == pytest.approx(0.95)
    m = [muon_momentum(s, 300, 0.85, 0.95) for s in range(400)]
    assert all(b >= a for a, b in zip(m, m[1:]))
    assert muon_momentum(0, 0, 0.85, 0.95) == pytest.approx(0.95)  # no warm-up: the end value
