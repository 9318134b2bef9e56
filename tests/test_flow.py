"""Flow matching: its path and target, the level densities, the shift, the weights, and the
fixed validation levels, against the formulas of Esser et al. 2024 (SD3)."""

import math

import pytest
import torch

from sdtune.diffusion.flow import FlowMatching


def test_path_target_and_draws_repeat_bit_for_bit():
    flow = FlowMatching("uniform")
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = flow.draw(x0, torch.Generator().manual_seed(1))
    b = flow.draw(x0, torch.Generator().manual_seed(1))
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.timesteps, b.timesteps)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=gen)
    u = torch.rand(6, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(a.timesteps, (u * 1000).float())
    s = (a.timesteps.double() / 1000).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(a.noisy, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(a.target, noise - x0)  # the velocity along the straight path
    assert a.weights is None
    # the ends of the path: the data at s = 0, the noise at s = 1
    noisy, _ = flow.at(x0, noise, torch.tensor([0.0] * 6))
    torch.testing.assert_close(noisy, x0)
    noisy, _ = flow.at(x0, noise, torch.tensor([1000.0] * 6))
    torch.testing.assert_close(noisy, noise)


def test_level_densities_and_the_shift():
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    logit = FlowMatching("logit_normal", logit_mean=0.5, logit_std=0.8).draw_fractions(
        n, gen, "cpu"
    )
    z = torch.logit(logit)
    assert z.mean() == pytest.approx(0.5, abs=0.01) and z.std() == pytest.approx(0.8, abs=0.01)
    mode = FlowMatching("mode", mode_scale=1.29).draw_fractions(n, gen, "cpu")
    uniform = FlowMatching("uniform").draw_fractions(n, gen, "cpu")
    assert 0 <= mode.min() and mode.max() <= 1
    middle = lambda u: float(((u > 0.25) & (u < 0.75)).double().mean())  # noqa: E731
    assert middle(mode) > middle(uniform) + 0.1  # a positive scale puts mass in the middle
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.equal(FlowMatching.shifted(u, 1.0), u)
    torch.testing.assert_close(FlowMatching.shifted(u, 3.0), 3 * u / (1 + 2 * u))
    assert FlowMatching.shifted(torch.tensor(0.5), 3.0) == pytest.approx(0.75)  # toward noise
    fixed = FlowMatching(shift=3.0)
    scaled = FlowMatching(shift=3.0, shift_resolution=1024, pixels_per_latent=8)
    small, large = torch.zeros(1, 16, 128, 128), torch.zeros(1, 16, 64, 128)  # 1024², 512x1024
    assert fixed.shift_for(small) == fixed.shift_for(large) == 3.0
    assert scaled.shift_for(small) == 3.0  # 1024 px latents (128 wide, 8 px each): as configured
    assert scaled.shift_for(large) == pytest.approx(3.0 / math.sqrt(2))  # half the pixels
    draws = FlowMatching("uniform", shift=3.0).draw(torch.zeros(4096, 1, 2, 2), gen)
    assert float((draws.timesteps / 1000).mean()) == pytest.approx(
        1.5 - math.log(3) * 0.75, abs=0.02
    )  # E[3u / (1 + 2u)] for u ~ U(0, 1)


def test_loss_weightings_and_a_curriculum_range():
    t = torch.tensor([100.0, 500.0, 900.0])
    s = t / 1000
    torch.testing.assert_close(FlowMatching(weighting="sigma_sqrt").weights(t), s.pow(-2))
    floored = FlowMatching(weighting="sigma_sqrt").weights(torch.tensor([0.01]))
    assert float(floored) == pytest.approx(1e6, rel=1e-4)  # s = 1e-5 counts as 1e-3
    torch.testing.assert_close(
        FlowMatching(weighting="cosmap").weights(t), 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    )
    flow = FlowMatching("uniform")
    flow.timestep_range = (0.5, 1.0)
    drawn = flow.draw(torch.zeros(512, 1, 2, 2), torch.Generator().manual_seed(3)).timesteps
    assert drawn.min() >= 500 and drawn.max() < 1000
    with pytest.raises(ValueError, match="sampling"):
        FlowMatching("lognormal")
    with pytest.raises(ValueError, match="weighting"):
        FlowMatching(weighting="snr")


def test_validation_levels_are_fixed_strata():
    flow = FlowMatching(shift=3.0)
    levels = flow.validation_timesteps(torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(levels, torch.tensor([1000 / 6, 500.0, 5000 / 6]))
    assert torch.equal(levels, flow.validation_timesteps(torch.tensor([0.5, 0.5, 0.5])))
    eight = flow.validation_timesteps(torch.full((8,), 0.5))
    assert len(eight) == 8 and bool((eight[1:] > eight[:-1]).all())
