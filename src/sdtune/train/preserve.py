"""Output preservation for LoRA: keep what the base draws for other prompts, without class images;
and DreamBooth's prior loss toward the base's own prediction (dreambooth.prior_target = 'base').

Plain LoRA learns from the instance images alone, and nothing in its loss says that the other
prompts must keep their meaning: the adapters that teach "a photo of sks dog" move every prompt
near it too (the few-shot benchmark's plain-LoRA row loses most on the digits whose prompts lie
near "nine"). DreamBooth's prior preservation fixes it with class images, which must be
generated or collected first. Output preservation (ai-toolkit's "differential output
preservation" does the same) asks the frozen base itself: every step, each image of the batch
also gets one of `lora.preserve_prompts`, the base (adapters switched off) predicts the noise
of the batch's noisy latents under that prompt, and the adapted model is pulled towards that
prediction, weighted by `lora.preserve_weight` and the same per-timestep weights as the
instance loss (with DreamBooth, on the instance images only: `rows`). The base's weights
never change (the adapters are all that trains), so its prediction is the exact target of
"change nothing for these prompts".

The preservation inputs ride in the same UNet call as the instance batch (twice the batch, or
the batch and its instance images with DreamBooth): one forward and one backward per
micro-batch, as DDP and torch.compile expect; the base's own prediction is one more forward
without gradients. Prompts are drawn from the step's noise
generator, so a resumed run draws the same ones.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from sdtune.config import RunConfig
from sdtune.models.bundle import ModelBundle
from sdtune.models.lora import has_lora
from sdtune.models.modes import evaluating


def lora_layers(*modules: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_off(*modules: torch.nn.Module):
    """The base model: every LoRA layer of `modules` bypassed, restored on exit."""
    with _bypassed(lora_layers(*modules)):
        yield


@contextmanager
def _bypassed(layers: list[torch.nn.Module]):
    before = [layer.disable_adapters for layer in layers]
    # peft's switch also sets requires_grad of the adapters: put back exactly what was there
    grads = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, before):
            layer.enable_adapters(not disabled)
        for p, flag in grads:
            p.requires_grad_(flag)


class OutputPreservation:
    """The preservation half of each training batch (see the module docstring)."""

    def __init__(
        self, cfg: RunConfig, bundle: ModelBundle, device: torch.device, autocast=nullcontext
    ) -> None:
        arch = bundle.arch
        self.prompts = list(cfg.lora.preserve_prompts)
        self.weight = float(cfg.lora.preserve_weight)
        self.bundle = bundle
        self.ids = arch.tokenize(bundle, self.prompts).to(device)
        encoders = list(bundle.text_encoders.values())
        # the text encoders read these prompts anew only where their own adapters change them
        self.te_adapted = any(has_lora(e) for e in encoders)
        self._layers = lora_layers(bundle.denoiser)  # found once: target() runs every step
        with torch.no_grad(), adapters_off(*encoders), evaluating(*encoders), autocast():
            # the base's text conditioning of each prompt, at the training step's precision:
            # constant, since the base never trains
            self.base = arch.encode(bundle, self.ids)

    @property
    def base_states(self) -> torch.Tensor:
        """The base's hidden states of each preserved prompt."""
        return self.base.hidden

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """One preservation prompt per image of the batch (indices), drawn from `gen`."""
        pick = torch.randint(len(self.prompts), (n,), generator=gen, device=gen.device)
        return pick.to(self.ids.device)

    @staticmethod
    def rows(batch, device) -> torch.Tensor | None:
        """The batch's rows that preservation is taken on: None for all of them, or, with
        DreamBooth, the instance images' indices. Half of a DreamBooth batch is class images,
        which their prior loss already holds. Preservation belongs where the adapters learn,
        on the noisy instance images under the other prompts, and it is a mean over those
        rows: each instance image counts as in a batch of instance images alone. The class
        rows are left out of the base's forward and of the denoiser's preservation half, so
        they cost nothing. Decided on the host from the batch's names: nothing is read back."""
        from sdtune.train.dreambooth import is_class_image

        instance = [i for i, n in enumerate(batch["names"]) if not is_class_image(n)]
        if len(instance) == len(batch["names"]):
            return None
        return torch.tensor(instance, dtype=torch.long).to(device, non_blocking=True)

    def target(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        pick: torch.Tensor,
        batch=None,
        rows: torch.Tensor | None = None,
    ):
        """The base's prediction on `noisy` under the drawn prompts: what must not change; at
        `rows` of the batch only, when given (see `rows`)."""
        bundle = self.bundle
        arch = bundle.arch
        with torch.no_grad(), _bypassed(self._layers), evaluating(bundle.denoiser):  # the base
            cond = arch.condition(bundle, self.base[pick], {"latents": noisy, **(batch or {})})
            if rows is not None:
                noisy, timesteps, cond = noisy[rows], timesteps[rows], cond[rows]
            return arch.predict(bundle, noisy, timesteps, cond)


class BasePrior:
    """dreambooth.prior_target = 'base' (LoRA): the class images' target is the frozen base's
    prediction on their noisy latents under their own prompts, not their true noise.

    DreamBooth's prior loss trains on the class images as data: generated ones carry the base's
    sampling errors (and a few bad draws), which the model then learns too. With the base at
    hand (the adapters switched off), the prior loss can instead ask the adapted model to
    predict what the base predicts there: zero at the start, it measures only how far the
    adapters moved the class, which is what prior preservation means to keep. One forward
    without gradients over the class rows of each batch."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self._layers = lora_layers(bundle.denoiser)
        encoders = list(bundle.text_encoders.values())
        self._te_layers = lora_layers(*encoders)
        self.te_adapted = bool(self._te_layers)

    @staticmethod
    def rows(batch, device) -> torch.Tensor:
        """Indices of the batch's class images (by their names)."""
        from sdtune.train.dreambooth import is_class_image

        names = batch["names"]
        return torch.tensor(
            [i for i, n in enumerate(names) if is_class_image(n)],
            dtype=torch.long,
            device=device,
        )

    def target(self, noisy, timesteps, cond, rows, batch, ids=None) -> torch.Tensor:
        """The base's prediction at `rows` of the batch. `cond` is the batch's conditioning;
        where the text encoders have adapters (`ids`: the batch's token ids), the base's own
        conditioning is computed instead."""
        bundle, arch = self.bundle, self.bundle.arch
        encoders = list(bundle.text_encoders.values())
        with torch.no_grad(), _bypassed(self._layers + self._te_layers):
            with evaluating(bundle.denoiser, *encoders):
                if self.te_adapted and ids is not None:
                    cond = arch.condition(bundle, arch.encode(bundle, ids), batch)
                return arch.predict(bundle, noisy[rows], timesteps[rows], cond[rows])
