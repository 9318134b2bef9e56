"""LoRA output preservation: the base is the adapted model with its adapters switched off."""

import pytest
import torch

from sdtune.config import LoraConfig, load_config
from sdtune.errors import ConfigError
from sdtune.models.lora import add_lora
from sdtune.models.presets import build_preset
from sdtune.train.preserve import OutputPreservation, adapters_off


def _predict(bundle, prompt="a photo of a circle"):
    ids = bundle.tokenize([prompt])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, bundle.unet.config.in_channels, 8, 8, generator=gen)
    with torch.no_grad():
        hidden = bundle.text_encoder(ids)[0]
        return bundle.unet(x, torch.tensor([400]), encoder_hidden_states=hidden).sample


@pytest.fixture
def adapted():
    bundle = build_preset("tiny-sd", 0)
    base = _predict(bundle)
    add_lora(bundle, LoraConfig(enabled=True, rank=4, text_encoder=True))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero: give the adapters something to change
        for name, p in [*bundle.unet.named_parameters(), *bundle.text_encoder.named_parameters()]:
            if ".lora_B." in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    return bundle, base


def test_adapters_off_is_the_base_and_puts_everything_back(adapted):
    bundle, base = adapted
    lora = {n: p for n, p in bundle.unet.named_parameters() if ".lora_" in n}
    frozen = next(iter(lora))
    lora[frozen].requires_grad_(False)  # a flag the switch must not overwrite
    on = _predict(bundle)
    assert (on - base).abs().max() > 1e-3
    with adapters_off(bundle.unet, bundle.text_encoder):
        torch.testing.assert_close(_predict(bundle), base)
    torch.testing.assert_close(_predict(bundle), on)
    assert not lora[frozen].requires_grad
    assert all(p.requires_grad for n, p in lora.items() if n != frozen)


def test_targets_are_the_base_predictions_under_the_drawn_prompts(adapted):
    bundle, _ = adapted
    prompts = ["a photo of a circle", "a photo of a triangle", ""]
    cfg = load_config(None, ["lora.enabled=true", f"lora.preserve_prompts={prompts!r}"])
    keep = OutputPreservation(cfg, bundle, torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    pick = keep.draw(6, gen)
    assert (
        pick.tolist() == torch.randint(3, (6,), generator=torch.Generator().manual_seed(2)).tolist()
    )
    x = torch.randn(6, bundle.unet.config.in_channels, 8, 8, generator=gen)
    t = torch.randint(1000, (6,), generator=gen)
    target = keep.target(x, t, pick)
    with torch.no_grad(), adapters_off(bundle.unet, bundle.text_encoder):
        hidden = bundle.text_encoder(bundle.tokenize([prompts[i] for i in pick]))[0]
        want = bundle.unet(x, t, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(target, want)
    assert target.requires_grad is False


def test_preservation_admits_a_new_tokens_vectors_unless_a_kept_prompt_uses_it():
    over = ["lora.enabled=true", "textual_inversion.token=<sks>"]
    load_config(None, [*over, "lora.preserve_prompts=['a dog']"])  # the vectors may train
    with pytest.raises(ConfigError, match="'a <sks> dog' uses the new token <sks>"):
        load_config(None, [*over, "lora.preserve_prompts=['a dog', 'a <sks> dog']"])


def test_preservation_refuses_trainable_base_patterns_at_load():
    # the only way a base weight trains with LoRA: checked at load, before any model is built
    frozen = r"lora.preserve_prompts needs every base weight frozen .*"
    with pytest.raises(
        ConfigError, match=frozen + r"model.trainable = \['unet.\*'\]; set it to \[\]"
    ):
        load_config(
            None,
            ["lora.enabled=true", "lora.preserve_prompts=['a dog']", "model.trainable=['unet.*']"],
        )


def test_the_base_target_has_no_dropout_and_leaves_the_modes_alone():
    bundle = build_preset("tiny-sd", 0, dropout=0.3)
    add_lora(bundle, LoraConfig(enabled=True, rank=4))
    bundle.unet.train()
    cfg = load_config(None, ["lora.enabled=true", "lora.preserve_prompts=['a photo of a circle']"])
    keep = OutputPreservation(cfg, bundle, torch.device("cpu"))
    x = torch.randn(
        2, bundle.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)
    )
    t, pick = torch.tensor([300, 700]), torch.tensor([0, 0])
    torch.manual_seed(1)
    first = keep.target(x, t, pick)
    torch.manual_seed(2)
    torch.testing.assert_close(keep.target(x, t, pick), first)  # dropout would differ
    assert all(m.training for m in bundle.unet.modules())


def test_the_base_states_are_taken_at_the_steps_precision():
    bundle = build_preset("tiny-sd", 0)
    add_lora(bundle, LoraConfig(enabled=True, rank=4, text_encoder=True))  # B = 0: the base

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    cfg = load_config(None, ["lora.enabled=true", "lora.preserve_prompts=['a photo of a circle']"])
    keep = OutputPreservation(cfg, bundle, torch.device("cpu"), autocast=bf16)
    assert keep.te_adapted
    with torch.no_grad(), bf16():
        adapted = bundle.text_encoder(keep.ids)[0]
    # the adapted half reads the same states at init: the preservation loss starts at zero
    assert torch.equal(keep.base_states, adapted)


def test_preservation_weighs_the_instance_images_alone_beside_dreambooths_class_images():
    from sdtune.diffusion.targets import diffusion_loss
    from sdtune.train.dreambooth import CLASS_PREFIX

    names = ["a.png", f"{CLASS_PREFIX}c1.png", "b.png", f"{CLASS_PREFIX}c2.png"]
    rows = OutputPreservation.rows({"names": names}, torch.device("cpu"))
    assert rows.tolist() == [0, 2]  # the class rows are left out
    # the loss on those rows is the mean over the instance images: each counts as in a batch
    # of instance images alone (the same as weighing all rows 0 for a class image, 4/2 else)
    snr = torch.tensor([0.5, 2.0, 1.0, 3.0])
    pred, target = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    masked = snr * torch.tensor([2.0, 0.0, 2.0, 0.0])
    assert torch.allclose(
        diffusion_loss(pred[rows], target[rows], snr[rows]), diffusion_loss(pred, target, masked)
    )
    # a batch of instance images alone: every row
    assert OutputPreservation.rows({"names": ["a", "b"]}, "cpu") is None


def test_the_bases_prediction_at_the_instance_rows_is_its_prediction_there():
    bundle = build_preset("tiny-sd", 0)
    add_lora(bundle, LoraConfig(enabled=True, rank=4))
    cfg = load_config(None, ["lora.enabled=true", "lora.preserve_prompts=['a', 'b c']"])
    keep = OutputPreservation(cfg, bundle, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=gen), torch.tensor([10, 500, 20, 900])
    pick = keep.draw(4, gen)
    rows = torch.tensor([1, 3])
    whole = keep.target(x, t, pick)
    torch.testing.assert_close(keep.target(x, t, pick, None, rows), whole[rows])
