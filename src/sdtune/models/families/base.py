"""What every model family implements: the one seam between sdtune and an architecture.

A family knows its components (which one denoises, which encode text, whether a VAE maps
images to latents), how they load from a diffusers folder or a single file and how they are
saved, how captions become a `Conditioning`, how the denoiser is called, its training
objective, its LoRA targets, and the file layouts of the ecosystem (single-file key names,
kohya LoRA names, textual-inversion embeddings, the diffusers pipeline that loads an export).
Nothing outside `models/families/` asks which family a model is: it asks the family.

Nothing here assumes a UNet, one text encoder or DDPM; the SD family (`sd.py`) is the first
implementation, and the base methods below are what families share.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sdtune.errors import ConfigError

if TYPE_CHECKING:
    from sdtune.config import DiffusionConfig
    from sdtune.models.bundle import ModelBundle


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, one row per image: the text encoders' hidden
    states, a pooled text embedding where the family uses one (SDXL, SD3), and extra
    per-image conditioning (SDXL's micro-conditioning time ids)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(
            fn(self.hidden),
            None if self.pooled is None else fn(self.pooled),
            {k: fn(v) for k, v in self.extra.items()},
        )

    def __getitem__(self, index) -> Conditioning:
        return self._map(lambda t: t[index])

    def to(self, *args, **kwargs) -> Conditioning:
        return self._map(lambda t: t.to(*args, **kwargs))

    def expand(self, n: int) -> Conditioning:
        """One row repeated `n` times (the empty prompt's conditioning for a batch)."""
        return self._map(lambda t: t.expand(n, *t.shape[1:]))

    def with_extra(self, **extra: torch.Tensor) -> Conditioning:
        return replace(self, extra={**self.extra, **extra})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        first = parts[0]
        return Conditioning(
            torch.cat([p.hidden for p in parts]),
            None if first.pooled is None else torch.cat([p.pooled for p in parts]),
            {k: torch.cat([p.extra[k] for p in parts]) for k in first.extra},
        )


class Family:
    """The operations an architecture supplies (see the module docstring). One instance per
    family (and variant), registered in `models/families/__init__.py`."""

    name: str = ""
    """Recorded in checkpoints, exports and sdtune_model.json: sd1, sd2, pixel, custom, sdxl."""
    label: str = ""
    """How it is printed, e.g. 'Stable Diffusion 1.x'."""
    denoiser: str = "unet"
    """The component that predicts the noise (the one trained by default)."""
    text_encoders: tuple[str, ...] = ("text_encoder",)
    """The text-encoder components, each with a tokenizer of the same name."""
    lora_text_encoders: tuple[str, ...] | None = None
    """The text encoders lora.text_encoder adapts (None: all of them)."""
    pipeline_class: str = ""
    """The diffusers pipeline that samples this family and loads its exports ('' for none)."""
    kohya_prefixes: dict[str, str] = {}
    """Component -> kohya LoRA key prefix (lora_unet, lora_te, lora_te1, ...)."""
    lora_targets: dict[str, tuple[str, ...]] = {}
    """Default LoRA targets, module-name suffixes, for the denoiser ("denoiser") and for each
    text encoder ("text_encoder"); `lora.unet_targets` / `lora.text_encoder_targets` override."""

    # ------------------------------------------------------------ components

    def components(self, bundle: ModelBundle) -> dict[str, torch.nn.Module]:
        """Every module by component name (the prefix of parameter names), VAE last."""
        return dict(bundle.modules)

    def is_text_encoder(self, component: str) -> bool:
        return component in self.text_encoders

    def image_channels(self, bundle: ModelBundle) -> int:
        vae = bundle.vae
        return int(vae.config.in_channels if vae is not None else self.latent_channels(bundle))

    def latent_channels(self, bundle: ModelBundle) -> int:
        return int(bundle.denoiser.config.in_channels)

    def downsample_factor(self, bundle: ModelBundle) -> int:
        """Pixels per latent cell along one side (1 for pixel-space models)."""
        vae = bundle.vae
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    def resolution_multiple(self, bundle: ModelBundle) -> int:
        """Image sides must be a multiple of this (the denoiser's total downsampling)."""
        raise NotImplementedError

    def bucket_step(self, bundle: ModelBundle, resolution: int) -> int:
        """Aspect-ratio bucket sides are multiples of this: the denoiser's downsampling, and at
        256 px and above at least 64 px, the step SD and SDXL are trained and fine-tuned with
        (kohya-ss, SimpleTuner, OneTrainer use it)."""
        import math

        multiple = self.resolution_multiple(bundle)
        return math.lcm(multiple, 64) if resolution >= 256 else multiple

    def default_resolution(self, bundle: ModelBundle) -> int:
        raise NotImplementedError

    def architecture(self, bundle: ModelBundle) -> dict[str, Any]:
        """The configs that fix the architecture, for a checkpoint's record."""
        raise NotImplementedError

    def describe(self, bundle: ModelBundle) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------ loading and saving

    optional_components: dict[str, str] = {}
    """Components a model may go without (model.<component> = false), and what each is."""

    def check_left_out(self, without: frozenset[str], source: str) -> None:
        """A one-line error when `without` names a component this family cannot go without."""
        extra = sorted(without - set(self.optional_components))
        if extra:
            name = extra[0]
            raise ConfigError(
                f"model.{name} = false: {source} ({self.label}) has no {name} it can leave out "
                "(only SD 3.x's T5, model.text_encoder_3, can be)"
            )

    def leave_out(self, bundle: ModelBundle, without: frozenset[str]) -> ModelBundle:
        """Drop the optional components `without` names that loading did not skip already,
        counting their weights in bundle.left_out."""
        for name in sorted(without):
            module = bundle.modules.pop(name, None)
            if module is not None:
                bundle.left_out[name] = sum(p.numel() for p in module.parameters())
            else:
                bundle.left_out.setdefault(name, 0)
        return bundle

    def load_folder(
        self, path: Path, source: str, info: dict, without: frozenset[str] = frozenset()
    ) -> ModelBundle:
        raise NotImplementedError

    def load_single_file(
        self, path: Path, config_dir: Path, source: str, without: frozenset[str] = frozenset()
    ) -> ModelBundle:
        raise NotImplementedError

    tokenizer_folders: dict[str, str] = {}
    """Text-encoder component -> the folder of its tokenizer in a diffusers pipeline."""

    def pipeline_index(self) -> dict:
        """model_index.json's components (after _class_name and _diffusers_version)."""
        return {}

    def save(self, bundle: ModelBundle, directory: Path, info: dict) -> None:
        """Write the bundle as a diffusers-layout folder (one folder per component, the
        denoiser's under its own name), with model_index.json where diffusers has a pipeline
        for it (not for pixel-space models), and sdtune_model.json."""
        directory.mkdir(parents=True, exist_ok=True)
        bundle.denoiser.save_pretrained(directory / self.denoiser, safe_serialization=True)
        for name, folder in self.tokenizer_folders.items():
            if name in bundle.modules:  # an optional encoder left out keeps its tokenizer
                bundle.modules[name].save_pretrained(directory / name, safe_serialization=True)
            bundle.tokenizers[name].save_pretrained(directory / folder)
        bundle.noise_scheduler.save_pretrained(directory / "scheduler")
        if bundle.vae is not None:
            bundle.vae.save_pretrained(directory / "vae", safe_serialization=True)
            index = {
                "_class_name": self.pipeline_class,
                "_diffusers_version": diffusers_version(),
                **self.pipeline_index(),
                **{name: [None, None] for name in bundle.left_out},
            }
            (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        write_model_info(bundle, directory, info)

    # ------------------------------------------------------------ conditioning

    def tokenize(self, bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
        """Token ids of `prompts`, one row per prompt (the family's layout: several encoders'
        ids side by side), so that batches of them concatenate and index as tensors do."""
        raise NotImplementedError

    def max_tokens(self, bundle: ModelBundle) -> int:
        raise NotImplementedError

    def token_counts(self, bundle: ModelBundle, prompts: list[str]) -> list[int]:
        """Tokens each prompt needs before truncation (to report long captions)."""
        raise NotImplementedError

    def encode(
        self,
        bundle: ModelBundle,
        ids: torch.Tensor,
        encoders: dict[str, torch.nn.Module] | None = None,
    ) -> Conditioning:
        """The text conditioning of token ids; `encoders` replaces modules (the training
        loop's wrapped ones)."""
        raise NotImplementedError

    def conditioning(self, bundle: ModelBundle, prompts: list[str], device) -> Conditioning:
        """The text conditioning of `prompts`, on `device`."""
        return self.encode(bundle, self.tokenize(bundle, prompts).to(device))

    def condition(self, bundle: ModelBundle, text: Conditioning, batch: dict) -> Conditioning:
        """The text conditioning plus what a batch's images add (nothing for SD)."""
        return text

    def predict(
        self,
        bundle: ModelBundle,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        cond: Conditioning,
        denoiser: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """The denoiser's output on noisy latents; `denoiser` replaces the module (the training
        loop's wrapped or compiled one)."""
        raise NotImplementedError

    # ------------------------------------------------------------ images and the objective

    def vae_precision(self, bundle: ModelBundle, tensor: torch.Tensor):
        """The context the VAE runs in (a family whose VAE overflows in float16 leaves any
        autocast here)."""
        return nullcontext()

    def encode_images(self, bundle: ModelBundle, pixels: torch.Tensor, generator=None):
        """Images in [-1, 1] to the denoiser's input space (VAE latents, scaled; or the pixels)."""
        vae = bundle.vae
        if vae is None:
            return pixels
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        return dist.sample(generator=generator) * vae.config.scaling_factor

    def decode_latents(self, bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
        """The denoiser's space back to images in [-1, 1]."""
        vae = bundle.vae
        if vae is None:
            return latents
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample

    def objective(self, bundle: ModelBundle, diffusion: DiffusionConfig, device):
        """The training objective (diffusion/objective.py) on this model's schedule."""
        raise NotImplementedError

    def apply_diffusion_settings(self, bundle: ModelBundle, diffusion: DiffusionConfig) -> None:
        """Apply diffusion.* overrides (prediction type, schedule) to the loaded model."""

    def set_dropout(self, bundle: ModelBundle, p: float) -> None:
        """model.dropout: dropout probability `p` inside the denoiser's blocks."""
        raise NotImplementedError

    def make_sampler(self, bundle: ModelBundle, name: str):
        raise NotImplementedError

    # ------------------------------------------------------------ file layouts

    def single_file_state(self, bundle: ModelBundle) -> dict[str, torch.Tensor]:
        """The whole model under the original (single-file) key names."""
        raise NotImplementedError

    def check_export(self, bundle: ModelBundle, fmt: str, base: str) -> None:
        """A one-line UserError when this model cannot be written as `fmt`."""

    def lora_loader(self):
        """The diffusers LoRA loader class that reads this family's LoRA files (both layouts)."""
        raise NotImplementedError

    def read_lora_file(self, path: str, bundle: ModelBundle):
        """(state, network alphas or None, peft metadata) of a LoRA file for `bundle`, as
        lora_loader reads it (kohya keys converted)."""
        return self.lora_loader().lora_state_dict(path, return_lora_metadata=True)

    def load_denoiser_lora(self, bundle: ModelBundle, state, alphas, metadata, name: str):
        """The denoiser's part of a LoRA file (as lora_loader read it) as adapter `name`."""
        raise NotImplementedError

    def kohya_refusal(self, bundle: ModelBundle, variant: str) -> str | None:
        """Why this model's adapters of `variant` have no kohya file (None: they have one)."""
        return None

    def kohya_modules(
        self,
        bundle: ModelBundle,
        component: str,
        modules: dict[str, dict[str, torch.Tensor]],
        alpha: float,
        variant: str,
    ) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
        """A component's adapters under the module names its kohya file uses (before the
        prefix; dots are made underscores after), each with its alpha: `modules` is module
        name -> {kohya weight kind (lora_down.weight, hada_w1_a, ...): tensor}, all of one
        `variant` at `alpha`. The default keeps the module names the component has."""
        return {name: (weights, alpha) for name, weights in modules.items()}

    def kohya_metadata(self, bundle: ModelBundle) -> dict[str, str]:
        """sd-scripts' ss_base_model_version, ss_v2 and modelspec.architecture for this family."""
        return {}

    def embedding_file(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A textual-inversion file's tensors from the vectors learned per text encoder."""
        raise NotImplementedError

    def read_embedding(self, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        """Vectors per text encoder from an embedding file's tensors (the inverse)."""
        raise NotImplementedError


def keyed_embedding_file(keys: dict[str, str], vectors: dict[str, torch.Tensor]):
    """A textual-inversion file of one tensor per text encoder, under `keys` (encoder -> key:
    SDXL's clip_l / clip_g, SD3's and t5)."""
    return {keys[name]: v for name, v in vectors.items()}


def read_keyed_embedding(keys: dict[str, str], state: dict, path: Path, label: str):
    """Vectors per text encoder from such a file, or a one-line error naming what it holds."""
    from sdtune.errors import UserError

    if set(state) != set(keys.values()):
        raise UserError(
            f"--embedding {path}: {label} embedding holds {_and(list(keys.values()))}, found "
            f"keys {sorted(state)[:4]}"
        )
    out = {}
    for name, key in keys.items():
        vectors = state[key].detach().float()
        out[name] = vectors.reshape(-1, vectors.shape[-1])
    return out


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def write_model_info(bundle, directory: Path, info: dict) -> None:
    """sdtune_model.json: the family, where the model came from, and the caller's metadata."""
    import sdtune
    from sdtune.models.bundle import MODEL_FILE

    record = {
        "family": bundle.family,
        "source": bundle.source,
        "sdtune_version": sdtune.__version__,
        **({"left_out": sorted(bundle.left_out)} if bundle.left_out else {}),
        **info,
    }
    (directory / MODEL_FILE).write_text(json.dumps(record, indent=2) + "\n")
