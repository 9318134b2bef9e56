"""A prediction ensemble: the members' denoiser outputs, weighted and summed at every step.

Every member reads the prompt with its own text encoders (a LoRA on them changes the
conditioning) and predicts on the same noisy latents; the weighted mean of the outputs is what
the sampler steps with and what the validation loss measures. Classifier-free guidance is
linear, so guiding the mean is guiding each member and averaging. The members share the latent
space: images are encoded and decoded by the first member's VAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtune.errors import UserError
from sdtune.models.bundle import ModelBundle
from sdtune.models.families import Conditioning


@dataclass
class Ensemble:
    members: list[ModelBundle]
    weights: list[float]
    """Normalised to sum to 1."""

    @property
    def first(self) -> ModelBundle:
        return self.members[0]

    def __len__(self) -> int:
        return len(self.members)

    def conditioning(self, prompts: list[str], device) -> list[Conditioning]:
        """Each member's text conditioning of `prompts`."""
        return [m.arch.conditioning(m, prompts, device) for m in self.members]

    def condition(self, texts: list[Conditioning], batch: dict) -> list[Conditioning]:
        return [m.arch.condition(m, t, batch) for m, t in zip(self.members, texts)]

    def predict(self, noisy: torch.Tensor, timesteps, conds: list[Conditioning]) -> torch.Tensor:
        """The weighted mean of the members' outputs (one member: its output, untouched)."""
        if len(self.members) == 1:
            m = self.first
            return m.arch.predict(m, noisy, timesteps, conds[0])
        total = None
        for m, w, c in zip(self.members, self.weights, conds):
            out = m.arch.predict(m, noisy, timesteps, c).float() * w
            total = out if total is None else total + out
        return total.to(noisy.dtype)

    def modules(self) -> list[torch.nn.Module]:
        return [mod for m in self.members for mod in m.arch.components(m).values()]

    def to(self, device) -> Ensemble:
        for m in self.members:
            m.to(device)
        return self


def as_ensemble(model: ModelBundle | Ensemble) -> Ensemble:
    return model if isinstance(model, Ensemble) else Ensemble([model], [1.0])


def normalised(weights: list[float] | None, count: int, flag: str = "--weights") -> list[float]:
    """`weights` (one per member, >= 0, not all 0) scaled to sum to 1; None: uniform."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise UserError(f"{flag}: {len(weights)} weight(s) for {count} model(s); give one each")
    if any(not w >= 0 or w > 1e6 for w in weights) or sum(weights) <= 0:
        raise UserError(f"{flag}: weights must be between 0 and 1e6, not all 0 (got {weights})")
    total = sum(weights)
    return [w / total for w in weights]


def check_compatible(members: list[ModelBundle], names: list[str]) -> None:
    """Members predict in one latent space: the same family, latent channels and VAE weights
    (a one-line error naming the member that differs)."""
    first = members[0]
    for m, name in zip(members[1:], names[1:]):
        if m.family != first.family:
            raise UserError(
                f"{name} is {m.arch.label}, but {names[0]} is {first.arch.label}; an "
                "ensemble's members must be of one family"
            )
        if m.arch.latent_channels(m) != first.arch.latent_channels(first):
            raise UserError(f"{name}: its latents have another shape than {names[0]}'s")
        if (m.vae is None) != (first.vae is None) or (
            m.vae is not None and not _same_weights(m.vae, first.vae)
        ):
            raise UserError(
                f"{name}: its VAE differs from {names[0]}'s, so their latents mean different "
                "images; ensemble fine-tunes of one base (with the VAE frozen)"
            )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
    )
