"""The DDPM options users ask for, each shown to do what it says: Huber and pseudo-Huber
losses, biased and logit-normal timesteps, input perturbation, zero-terminal-SNR schedules and
rescaled guidance."""

import math

import pytest
import torch

from sdtune.config import DiffusionConfig, ModelConfig
from sdtune.diffusion.flow import FlowMatching
from sdtune.diffusion.objective import DDPM, timestep_density
from sdtune.diffusion.schedules import make_noise_scheduler, snr
from sdtune.diffusion.targets import diffusion_loss, elementwise_error, training_target
from sdtune.errors import ConfigError
from sdtune.evaluate.sampling import rescale_guidance
from sdtune.models.loading import load_model

ABAR = make_noise_scheduler(1000, "scaled_linear", "epsilon").alphas_cumprod


# ------------------------------------------------------------------ the loss


def test_huber_losses_are_the_square_for_small_errors_and_linear_for_large():
    small, large = torch.tensor([1e-3]), torch.tensor([10.0])
    zero = torch.zeros(1)
    for kind in ("huber", "pseudo_huber"):
        assert elementwise_error(small, zero, kind, 0.1).item() == pytest.approx(1e-6, rel=1e-3)
        # beyond delta: 2 delta |r| - delta² (Huber), about the same for pseudo-Huber
        assert elementwise_error(large, zero, kind, 0.1).item() == pytest.approx(1.99, rel=1e-2)
    assert elementwise_error(large, zero, "mse").item() == 100.0
    # pseudo-Huber written out: 2 delta (sqrt(r² + delta²) - delta)
    r = torch.tensor([0.05, 0.3, -2.0])
    expected = 2 * 0.1 * (torch.sqrt(r**2 + 0.01) - 0.1)
    torch.testing.assert_close(elementwise_error(r, torch.zeros(3), "pseudo_huber", 0.1), expected)
    with pytest.raises(ValueError, match="unknown loss"):
        elementwise_error(r, r, "l1")


def test_a_huber_fit_is_not_pulled_by_an_outlier():
    """The effect users want: nine clean targets at 0 and one corrupted at 10. Fitting one
    value by gradient descent, MSE lands at their mean (1.0), Huber next to the clean ones."""
    targets = torch.tensor([0.0] * 9 + [10.0]).view(10, 1)
    fits = {}
    for kind in ("mse", "huber", "pseudo_huber"):
        c = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([c], lr=0.2)
        for _ in range(500):
            opt.zero_grad()
            diffusion_loss(c.expand(10, 1), targets, kind=kind, delta=0.1).backward()
            opt.step()
        fits[kind] = c.item()
    assert fits["mse"] == pytest.approx(1.0, abs=1e-3)
    assert fits["huber"] < 0.12 and fits["pseudo_huber"] < 0.12


def test_the_objective_trains_with_the_configured_loss():
    ddpm = DDPM(ABAR, "epsilon").configure(DiffusionConfig(loss="huber", huber_delta=0.5))
    pred, target = torch.full((2, 1, 2, 2), 3.0), torch.zeros(2, 1, 2, 2)
    assert ddpm.loss(pred, target).item() == pytest.approx(2 * 0.5 * 3.0 - 0.25)
    assert DDPM(ABAR, "epsilon").loss(pred, target).item() == 9.0  # MSE by default


# ------------------------------------------------------------------ timesteps


def _draws(density, n=40000, sampling="uniform", seed=0, span=(0.0, 1.0)):
    ddpm = DDPM(ABAR, "epsilon", timestep_sampling=sampling, density=density)
    ddpm.timestep_range = span
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([ddpm.draw_timesteps(100, gen, "cpu") for _ in range(n // 100)])


def test_timestep_bias_makes_the_favoured_part_as_likely_as_asked():
    # 'earlier' quarter at 3x: P(t < 250) = 0.75 / (0.75 + 0.75) = 0.5 (uniform: 0.25)
    earlier = timestep_density(1000, bias="earlier", portion=0.25, multiplier=3.0)
    for sampling in ("uniform", "low_discrepancy"):
        t = _draws(earlier, sampling=sampling)
        assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.long
        assert (t < 250).float().mean().item() == pytest.approx(0.5, abs=0.015)
    later = _draws(timestep_density(1000, bias="later", portion=0.25, multiplier=3.0))
    assert (later >= 750).float().mean().item() == pytest.approx(0.5, abs=0.015)
    # 'range' [0.6, 1.0) at 4x: 1.6 / (1.6 + 0.6)
    ranged = _draws(timestep_density(1000, bias="range", multiplier=4.0, bias_range=(0.6, 1.0)))
    assert (ranged >= 600).float().mean().item() == pytest.approx(1.6 / 2.2, abs=0.015)
    # a multiplier below 1 makes the part rarer
    rare = _draws(timestep_density(1000, bias="earlier", portion=0.5, multiplier=0.25))
    assert (rare < 500).float().mean().item() == pytest.approx(0.2, abs=0.015)
    # a curriculum stage's range still bounds the biased draws
    staged = _draws(earlier, n=2000, span=(0.5, 1.0))
    assert staged.min() >= 500


def test_logit_normal_timesteps_train_the_middle_most():
    t = _draws(timestep_density(1000, "logit_normal")).double()
    # P(|z| < logit(0.75)) for z ~ N(0, 1): the middle half of [0, T) gets about 73%
    middle = math.erf(math.log(3.0) / math.sqrt(2.0))
    assert ((t >= 250) & (t < 750)).double().mean().item() == pytest.approx(middle, abs=0.015)
    assert t.mean().item() == pytest.approx(499.5, abs=8)
    noisier = _draws(timestep_density(1000, "logit_normal", logit_mean=1.0)).double()
    assert noisier.mean().item() > 640  # sigmoid(1) = 0.73 of the way, as its median
    assert noisier.median().item() == pytest.approx(731, abs=10)


def test_without_options_the_draws_stay_those_of_before():
    assert timestep_density(1000) is None and timestep_density(1000, "low_discrepancy") is None
    gen_a, gen_b = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    latents = torch.randn(3, 1, 4, 4)
    noised = DDPM(ABAR, "epsilon").draw(latents, gen_a)
    noise = torch.randn(latents.shape, generator=gen_b)
    assert torch.equal(noised.timesteps, torch.randint(0, 1000, (3,), generator=gen_b))
    assert torch.equal(noised.target, noise)


def test_bias_options_are_checked():
    with pytest.raises(ValueError, match="timestep_bias_range"):
        DiffusionConfig(timestep_bias="range")
    with pytest.raises(ValueError, match="timestep_bias_range"):
        DiffusionConfig(timestep_bias_range=(0.2, 0.4))
    with pytest.raises(ValueError, match="0 <= low < high <= 1"):
        DiffusionConfig(timestep_bias="range", timestep_bias_range=(0.5, 0.2))


# ------------------------------------------------------------------ input perturbation


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_input_perturbation_noises_the_input_only(prediction):
    latents = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = DDPM(ABAR, prediction).draw(latents, torch.Generator().manual_seed(5))
    ddpm = DDPM(ABAR, prediction).configure(DiffusionConfig(input_perturbation=0.1))
    gen = torch.Generator().manual_seed(5)
    perturbed = ddpm.draw(latents, gen)
    # the same noise and timesteps, then xi drawn last; the target is the unperturbed one's
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(latents.shape, generator=gen)
    torch.randint(0, 1000, (4,), generator=gen)
    xi = torch.randn(latents.shape, generator=gen)
    assert torch.equal(perturbed.timesteps, plain.timesteps)
    torch.testing.assert_close(
        perturbed.target, training_target(prediction, latents, noise, plain.timesteps, ABAR)
    )
    torch.testing.assert_close(perturbed.target, plain.target)
    abar = ABAR[plain.timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(perturbed.noisy - plain.noisy, (1 - abar).sqrt() * 0.1 * xi)


def test_input_perturbation_under_flow_matching():
    latents = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    plain = FlowMatching("uniform").draw(latents, torch.Generator().manual_seed(2))
    flow = FlowMatching("uniform").configure(DiffusionConfig(input_perturbation=0.2))
    gen = torch.Generator().manual_seed(2)
    perturbed = flow.draw(latents, gen)
    gen = torch.Generator().manual_seed(2)
    torch.randn(latents.shape, generator=gen)
    torch.rand(3, generator=gen, dtype=torch.float64)
    xi = torch.randn(latents.shape, generator=gen)
    s = (plain.timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(perturbed.target, plain.target)
    torch.testing.assert_close(perturbed.noisy - plain.noisy, s * 0.2 * xi)


# ------------------------------------------------------------------ zero terminal SNR


def test_zero_terminal_snr_makes_the_last_timestep_pure_noise():
    base = load_model(ModelConfig(base="preset:tiny-sd"), DiffusionConfig(), seed=0)
    assert snr(base.noise_scheduler.alphas_cumprod, torch.tensor([999])).item() > 1e-3
    diffusion = DiffusionConfig(zero_terminal_snr=True, prediction_type="v_prediction")
    bundle = load_model(ModelConfig(base="preset:tiny-sd"), diffusion, seed=0)
    abar = bundle.noise_scheduler.alphas_cumprod
    assert abar[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert snr(abar, torch.tensor([999])).item() == pytest.approx(0.0, abs=1e-12)
    # the first timestep's signal is unchanged (Lin et al. 2024 keep sqrt(abar_0))
    torch.testing.assert_close(abar[0], base.noise_scheduler.alphas_cumprod[0])
    # training: x_T is the noise itself, and v at T is -x_0
    ddpm = bundle.arch.objective(bundle, diffusion, "cpu")
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    noisy, target = ddpm.at(x0, noise, torch.tensor([999, 999]))
    torch.testing.assert_close(noisy, noise)
    torch.testing.assert_close(target, -x0)
    # every sampler starts from the last timestep (trailing spacing)
    for name in ("ddim", "euler", "dpm++"):
        sampler = bundle.arch.make_sampler(bundle, name)
        sampler.set_timesteps(10)
        assert int(sampler.timesteps[0]) == 999, name
    with pytest.raises(ConfigError, match="diffusion.prediction_type = 'v_prediction'"):
        load_model(ModelConfig(base="preset:tiny-sd"), DiffusionConfig(zero_terminal_snr=True), 0)


# ------------------------------------------------------------------ rescaled guidance


def test_rescaled_guidance_takes_the_conditional_scale():
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 4, 8, 8, generator=gen)
    uncond = torch.randn(2, 4, 8, 8, generator=gen)
    guided = uncond + 7.5 * (cond - uncond)
    full = rescale_guidance(guided, cond, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    # same direction per image, only its scale changes
    cosine = torch.nn.functional.cosine_similarity(full.flatten(1), guided.flatten(1))
    torch.testing.assert_close(cosine, torch.ones(2))
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.0), guided)
    mixed = rescale_guidance(guided, cond, 0.7)
    torch.testing.assert_close(mixed, 0.7 * full + 0.3 * guided)


def test_sampling_applies_the_rescale():
    from sdtune.evaluate.sampling import generate

    bundle = load_model(ModelConfig(base="preset:tiny-digits"), DiffusionConfig(), seed=0)
    kwargs = dict(seed=3, steps=3, guidance_scale=7.5, resolution=16)
    plain = generate(bundle, ["a photo of the digit 1"], **kwargs)
    again = generate(bundle, ["a photo of the digit 1"], guidance_rescale=0.0, **kwargs)
    rescaled = generate(bundle, ["a photo of the digit 1"], guidance_rescale=0.7, **kwargs)
    assert torch.equal(plain, again) and not torch.equal(plain, rescaled)


def test_flow_matching_takes_the_loss_options_and_refuses_ddpm_ones():
    bundle = load_model(ModelConfig(base="preset:tiny-digits-sd3"), DiffusionConfig(), seed=0)
    options = DiffusionConfig(loss="pseudo_huber", huber_delta=0.3, input_perturbation=0.1)
    flow = bundle.arch.objective(bundle, options, "cpu")
    assert (flow.loss_kind, flow.huber_delta, flow.input_perturbation) == ("pseudo_huber", 0.3, 0.1)
    for key, value in [
        ("zero_terminal_snr", True),
        ("timestep_bias", "later"),
        ("timestep_sampling", "logit_normal"),
    ]:
        with pytest.raises(ConfigError, match=f"diffusion.{key} = .* is DDPM's"):
            bundle.arch.objective(bundle, DiffusionConfig(**{key: value}), "cpu")
