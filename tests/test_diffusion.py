import torch

from sdtune.diffusion.schedules import (
    add_noise,
    make_noise_scheduler,
    sample_timesteps,
    snr,
    stratified_timesteps,
)
from sdtune.diffusion.targets import (
    diffusion_loss,
    min_snr_weights,
    offset_noise,
    training_target,
    velocity,
)


def _setup(schedule="scaled_linear"):
    sched = make_noise_scheduler(1000, schedule, "epsilon")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g)
    noise = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    return sched, x0, noise, t


def test_add_noise_matches_diffusers_for_every_schedule():
    for schedule in ["linear", "scaled_linear", "squaredcos_cap_v2"]:
        sched, x0, noise, t = _setup(schedule)
        ours = add_noise(x0, noise, t, sched.alphas_cumprod)
        torch.testing.assert_close(ours, sched.add_noise(x0, noise, t))


def test_velocity_matches_diffusers():
    sched, x0, noise, t = _setup()
    torch.testing.assert_close(
        velocity(x0, noise, t, sched.alphas_cumprod), sched.get_velocity(x0, noise, t)
    )
    assert training_target("epsilon", x0, noise, t, sched.alphas_cumprod) is noise


def test_velocity_identity_recovers_x0():
    # x0 = sqrt(ab) x_t - sqrt(1 - ab) v (Salimans & Ho 2022)
    sched, x0, noise, t = _setup()
    ac = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = add_noise(x0, noise, t, sched.alphas_cumprod)
    v = velocity(x0, noise, t, sched.alphas_cumprod)
    torch.testing.assert_close(ac.sqrt() * xt - (1 - ac).sqrt() * v, x0, atol=1e-5, rtol=1e-5)


def test_snr_is_decreasing_in_t():
    sched, *_ = _setup()
    values = snr(sched.alphas_cumprod, torch.arange(1000))
    assert torch.all(values[1:] < values[:-1])


def test_min_snr_weights():
    s = torch.tensor([0.5, 5.0, 50.0])
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(
        min_snr_weights(s, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 51])
    )


def test_offset_noise_adds_per_channel_constant():
    noise = torch.zeros(2, 3, 4, 4)
    out = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert out.shape == noise.shape
    assert torch.all(out.std(dim=(2, 3)) == 0) and out.abs().sum() > 0
    assert offset_noise(noise, 0.0) is noise


def test_timesteps_are_seeded_and_in_range():
    a = sample_timesteps(64, 1000, torch.Generator().manual_seed(1), "cpu")
    b = sample_timesteps(64, 1000, torch.Generator().manual_seed(1), "cpu")
    assert torch.equal(a, b) and a.min() >= 0 and a.max() < 1000
    s = stratified_timesteps(4, 1000)
    assert s.tolist() == [125, 375, 625, 875]


def test_weighted_loss():
    pred = torch.ones(2, 1, 2, 2)
    target = torch.zeros(2, 1, 2, 2)
    assert diffusion_loss(pred, target).item() == 1.0
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.0])).item() == 0.5


def test_low_discrepancy_timesteps_cover_the_range_evenly():
    from sdtune.diffusion.schedules import low_discrepancy_timesteps

    t = low_discrepancy_timesteps(10, 1000, torch.Generator().manual_seed(3), "cpu")
    gaps = torch.diff(torch.sort(t).values)
    assert t.dtype == torch.long and ((0 <= t) & (t < 1000)).all()
    assert ((gaps >= 99) & (gaps <= 101)).all()  # one in each tenth of [0, T)
    again = low_discrepancy_timesteps(10, 1000, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(t, again)  # a function of the generator (exact resume)
    gen = torch.Generator().manual_seed(0)
    first = torch.stack([low_discrepancy_timesteps(4, 1000, gen, "cpu")[0] for _ in range(4000)])
    assert abs(first.float().mean().item() - 499.5) < 15  # each one is still uniform
    assert torch.histc(first.float(), bins=4, min=0, max=1000).min() > 900
