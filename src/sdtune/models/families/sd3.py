"""Stable Diffusion 3 and 3.5: one `SD3Transformer2DModel` (MMDiT: the image and text tokens
attend jointly; 3.5 adds dual attention and QK-norm, both in the transformer's config), three
text encoders (CLIP ViT-L and OpenCLIP ViT-bigG, both with their projections, and T5-XXL), a
16-channel KL VAE with a shift (or none: the pixel-space `preset:tiny-digits-sd3`), and flow
matching instead of DDPM (diffusion/flow.py).

What this module has to say about it (Esser et al. 2024, and diffusers' StableDiffusion3Pipeline,
whose conditioning this reproduces):
- the conditioning: both CLIP encoders' penultimate hidden states side by side on the feature
  axis, zero-padded to T5's width, then T5's last hidden states after them on the sequence
  axis; the pooled embedding is both CLIP encoders' projected outputs side by side;
- the empty prompt is encoded as any prompt is (SD3 is trained and guided so; no zeros);
- the token ids of the three tokenizers travel side by side in one row;
- latents are (VAE sample - shift_factor) x scaling_factor, and back;
- the denoiser reads the timestep as 1000 x the noise level s in [0, 1]; it is sampled with
  diffusers' FlowMatchEulerDiscreteScheduler at the model's shift.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from sdtune.errors import ConfigError, ModelError, UserError
from sdtune.models.families.base import (
    Conditioning,
    Family,
    keyed_embedding_file,
    read_keyed_embedding,
)
from sdtune.models.families.sd import (
    check_tokenizer,
    load_component,
    load_weights,
    most_tokens,
    text_config,
    tokenize_side_by_side,
)
from sdtune.models.families.sd3_keys import (
    SINGLE_FILE_PREFIXES,
    exact_on,
    kohya_lora_to_peft,
    lora_to_original,
    module_map,
    transformer_to_original,
)

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
CLIP_ENCODERS = TEXT_ENCODERS[:2]
TOKENIZER_FOLDERS = {
    "text_encoder": "tokenizer",
    "text_encoder_2": "tokenizer_2",
    "text_encoder_3": "tokenizer_3",
}
# a textual-inversion file's tensor per encoder: SDXL's clip_l / clip_g, and T5's
EMBEDDING_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5"}
# diffusers' DDPM-only settings, which flow matching has no use for
DDPM_ONLY = ("prediction_type", "noise_schedule", "min_snr_gamma")


class StableDiffusion3(Family):
    denoiser = "transformer"
    text_encoders = TEXT_ENCODERS
    lora_text_encoders = CLIP_ENCODERS  # T5 is frozen: 4.7B weights, not what a LoRA adapts
    optional_components = {"text_encoder_3": "T5"}  # model.text_encoder_3 = false
    kohya_prefixes = {
        "transformer": "lora_unet",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
        "text_encoder_3": "lora_te3",
    }
    # the joint attention's projections of both streams (image: to_*, text: add_*_proj and
    # to_add_out) and both feed-forwards; every projection of CLIP's attention and MLP
    lora_targets = {
        "denoiser": (
            "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
            "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
        ),
        "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    }  # fmt: skip

    tokenizer_folders = TOKENIZER_FOLDERS

    def __init__(self, name: str, label: str) -> None:
        self.name, self.label = name, label
        self.pipeline_class = "" if name == "pixel-sd3" else "StableDiffusion3Pipeline"

    # ------------------------------------------------------------ components

    def resolution_multiple(self, bundle) -> int:
        return self.downsample_factor(bundle) * int(bundle.denoiser.config.patch_size)

    def default_resolution(self, bundle) -> int:
        return int(bundle.denoiser.config.sample_size) * self.downsample_factor(bundle)

    def architecture(self, bundle) -> dict:
        record = {
            "transformer": {
                k: v for k, v in dict(bundle.denoiser.config).items() if not k.startswith("_")
            }
        }
        for name in TEXT_ENCODERS:
            if name in bundle.modules:
                record[name] = bundle.modules[name].config.to_diff_dict()
        return record

    def describe(self, bundle) -> str:
        space = (
            "pixel space" if bundle.vae is None else f"latents /{self.downsample_factor(bundle)}"
        )
        config = bundle.denoiser.config
        return (
            f"model: {bundle.source} | family {self.name} | {space} | flow matching, shift "
            f"{float(bundle.noise_scheduler.config.shift):g} | MMDiT {config.num_layers} layers x "
            f"{config.num_attention_heads * config.attention_head_dim} wide | pooled "
            f"{config.pooled_projection_dim} | text CLIP-L + CLIP-G + {self._t5_said(bundle)}"
        )

    @staticmethod
    def _t5_said(bundle) -> str:
        if "text_encoder_3" in bundle.modules:
            return "T5"
        weights = bundle.left_out.get("text_encoder_3", 0)
        saved = (
            f": {weights / 1e6:,.1f}M weights not loaded, {weights * 4 / 2**30:,.2f} GiB in "
            f"float32 ({weights * 2 / 2**30:,.2f} GiB in bf16)"
            if weights
            else ""
        )
        return f"no T5 (its states zeros{saved})"

    # ------------------------------------------------------------ loading and saving

    def bundle(self, transformer, encoders, tokenizers, scheduler, vae, source: str):
        from sdtune.models.bundle import ModelBundle

        modules = {"transformer": transformer, **dict(zip(TEXT_ENCODERS, encoders))}
        if vae is not None:
            modules["vae"] = vae
        return ModelBundle(
            self.name, modules, dict(zip(TEXT_ENCODERS, tokenizers)), scheduler, source
        )

    @staticmethod
    def check_layout(path: Path, key: str = "model.base") -> None:
        """The folders an SD3 pipeline needs (text_encoder_3/ may be missing: a model without
        T5, as StableDiffusion3Pipeline(text_encoder_3=None) saves it)."""
        wanted = ("transformer", *CLIP_ENCODERS, *TOKENIZER_FOLDERS.values(), "scheduler")
        missing = [c for c in wanted if not (path / c).is_dir()]
        if missing:
            raise ModelError(
                f"{key}: {path} has no {'/, '.join(missing)}/ folder; an SD3 pipeline folder "
                "holds transformer/, text_encoder/ to text_encoder_3/, tokenizer/ to "
                "tokenizer_3/, scheduler/ (and vae/)"
            )

    def load_folder(self, path: Path, source: str, info: dict, without=frozenset()):
        """A diffusers SD3 folder; T5 is not read when `without` names it or the folder has
        none."""
        self.check_layout(path)
        from transformers import T5TokenizerFast

        transformer = load_weights(path, "transformer", SD3Transformer2DModel)
        vae = None
        if (path / "vae" / "config.json").is_file():
            vae = load_weights(path, "vae", AutoencoderKL)
        classes = (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel)
        skipped = self._skipped_t5(path, without)
        names = CLIP_ENCODERS if skipped is not None else TEXT_ENCODERS
        encoders = [load_weights(path, n, c) for n, c in zip(names, classes)]
        tokenizers = []
        for folder, cls in zip(
            TOKENIZER_FOLDERS.values(), (CLIPTokenizer, CLIPTokenizer, T5TokenizerFast)
        ):
            tokenizer = load_component(
                path, folder, lambda f=folder, c=cls: c.from_pretrained(path, subfolder=f)
            )
            check_tokenizer(tokenizer, path / folder)
            tokenizers.append(tokenizer)
        scheduler = load_component(
            path,
            "scheduler",
            lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
        )
        bundle = self.bundle(transformer, encoders, tokenizers, scheduler, vae, source)
        if skipped is not None:
            bundle.left_out["text_encoder_3"] = skipped
        return bundle

    @staticmethod
    def _skipped_t5(path: Path, without) -> int | None:
        """None when T5 is to be loaded from `path`; else its weight count, from its config on
        the meta device (0: the folder has no T5)."""
        config = path / "text_encoder_3" / "config.json"
        if "text_encoder_3" not in without and config.is_file():
            return None
        if not config.is_file():
            return 0
        from transformers import T5Config

        with torch.device("meta"):
            t5 = T5EncoderModel(T5Config.from_pretrained(path / "text_encoder_3"))
        return sum(p.numel() for p in t5.parameters())

    def load_single_file(self, path: Path, config_dir: Path, source: str, without=frozenset()):
        """An SD 3.x single file (the original layout, single_file_state's) through diffusers'
        StableDiffusion3Pipeline.from_single_file, the configs and tokenizers from `config_dir`;
        the VAE and text encoders a .safetensors lacks (files of the transformer alone, or
        without T5) come from there too, which diffusers does not do by itself."""
        from diffusers import StableDiffusion3Pipeline

        if not self.pipeline_class:
            raise ModelError(
                f"model.config_source: {config_dir} is a pixel-space model (no VAE), which has no "
                "SD3 single-file layout; point it at the diffusers folder of an SD3 model"
            )
        self.check_layout(config_dir, "model.config_source")
        try:
            pipe = StableDiffusion3Pipeline.from_single_file(
                str(path),
                config=str(config_dir),
                local_files_only=True,
                **self.parts_not_in(path, config_dir, without),
            )
        except ModelError:
            raise
        except Exception as exc:  # diffusers raises many types for unreadable or mismatched files
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(
                f"model.base: cannot load SD3 single-file checkpoint {path}: {first}"
            ) from exc
        tokenizers = (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3)
        for tokenizer, folder in zip(tokenizers, TOKENIZER_FOLDERS.values()):
            check_tokenizer(tokenizer, config_dir / folder)
        encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
        if pipe.text_encoder_3 is None:
            encoders.pop()
        bundle = self.bundle(
            pipe.transformer, encoders, tokenizers, pipe.scheduler, pipe.vae, source
        )
        if pipe.text_encoder_3 is None:
            bundle.left_out["text_encoder_3"] = self._skipped_t5(config_dir, without) or 0
        return bundle

    def parts_not_in(self, path: Path, config_dir: Path, without=frozenset()) -> dict:
        """The VAE and text encoders a .safetensors single file holds nothing of, loaded from
        the diffusers folder `config_dir` (a .ckpt is taken to hold them all); T5 not at all
        when `without` names it or neither holds one."""
        from safetensors import safe_open

        t5_out = "text_encoder_3" in without
        if path.suffix != ".safetensors":
            return {"text_encoder_3": None} if t5_out else {}
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
        classes = {
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModelWithProjection,
            "text_encoder_2": CLIPTextModelWithProjection,
            "text_encoder_3": T5EncoderModel,
        }
        parts = {}
        for name, cls in classes.items():
            in_file = any(k.startswith(SINGLE_FILE_PREFIXES[name]) for k in keys)
            in_folder = (config_dir / name / "config.json").is_file()
            if name == "text_encoder_3" and (t5_out or not (in_file or in_folder)):
                parts[name] = None  # left out, or in neither: a model without T5
            elif not in_file:
                parts[name] = load_weights(config_dir, name, cls)
        return parts

    def pipeline_index(self) -> dict:
        return {
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "text_encoder_3": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        }

    # ------------------------------------------------------------ conditioning

    def _tokenizers(self, bundle):
        return [bundle.tokenizers[name] for name in TEXT_ENCODERS]

    def tokenize(self, bundle, prompts: list[str]) -> torch.Tensor:
        """The three tokenizers' ids side by side: [CLIP-L | CLIP-G | T5]."""
        return tokenize_side_by_side(bundle, self._tokenizers(bundle), prompts)

    def max_tokens(self, bundle) -> int:
        return min(int(t.model_max_length) for t in self._tokenizers(bundle)[:2])

    def token_counts(self, bundle, prompts: list[str]) -> list[int]:
        return most_tokens(self._tokenizers(bundle)[:2], prompts)

    def encode(self, bundle, ids, encoders=None) -> Conditioning:
        """CLIP-L's and CLIP-G's penultimate states side by side, padded to T5's width, then
        T5's states after them; CLIP-L's and CLIP-G's projected pooled outputs side by side."""
        modules = {**bundle.text_encoders, **(encoders or {})}
        lengths = [int(t.model_max_length) for t in self._tokenizers(bundle)]
        parts = torch.split(ids, lengths, dim=1)
        hidden, pooled = [], []
        for name, part in zip(CLIP_ENCODERS, parts):
            out = modules[name](part, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        if "text_encoder_3" in modules:
            t5 = modules["text_encoder_3"](parts[2])[0]
        else:  # T5 left out: zeros in its place, as StableDiffusion3Pipeline gives
            width = int(bundle.denoiser.config.joint_attention_dim)
            t5 = clip.new_zeros(clip.shape[0], parts[2].shape[1], width)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, -1))

    def predict(self, bundle, noisy, timesteps, cond, denoiser=None):
        transformer = denoiser if denoiser is not None else bundle.denoiser
        if cond.pooled is None:
            raise ValueError("SD3 needs a Conditioning with pooled embeddings")
        config = bundle.denoiser.config  # the wrapped (DDP, compiled) module's too
        most = int(config.pos_embed_max_size) * int(config.patch_size)
        if max(noisy.shape[-2:]) > most:  # diffusers would raise deep inside the embedding
            factor = self.downsample_factor(bundle)
            raise UserError(
                f"{noisy.shape[-1] * factor}x{noisy.shape[-2] * factor} px: this transformer's "
                f"position embedding covers at most {most * factor} px a side; train and "
                "sample smaller (data.resolution, data.buckets, --width/--height)"
            )
        t = timesteps.reshape(-1).expand(noisy.shape[0]) if timesteps.numel() == 1 else timesteps
        return transformer(
            hidden_states=noisy,
            timestep=t,
            encoder_hidden_states=cond.hidden,
            pooled_projections=cond.pooled,
        ).sample

    # ------------------------------------------------------------ images and the objective

    def encode_images(self, bundle, pixels, generator=None):
        vae = bundle.vae
        if vae is None:
            return pixels
        dist = vae.encode(pixels.to(vae.dtype)).latent_dist
        shift = float(vae.config.shift_factor or 0.0)
        return (dist.sample(generator=generator) - shift) * vae.config.scaling_factor

    def decode_latents(self, bundle, latents):
        vae = bundle.vae
        if vae is None:
            return latents
        shift = float(vae.config.shift_factor or 0.0)
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample

    def objective(self, bundle, diffusion, device):
        from sdtune.diffusion.flow import FlowMatching

        for key in DDPM_ONLY:
            if getattr(diffusion, key) is not None:
                raise ConfigError(
                    f"diffusion.{key}: {self.label} trains with flow matching, which has no "
                    "such setting; use diffusion.flow_* (flow_sampling, flow_weighting, "
                    "flow_shift) or remove it"
                )
        ddpm_choices = {
            "timestep_sampling": (diffusion.timestep_sampling, "uniform"),
            "timestep_bias": (diffusion.timestep_bias, "none"),
            "zero_terminal_snr": (diffusion.zero_terminal_snr, False),
        }
        for key, (value, default) in ddpm_choices.items():
            if value != default:
                raise ConfigError(
                    f"diffusion.{key} = {value!r} is DDPM's; flow matching draws its noise "
                    "levels by diffusion.flow_sampling (logit_normal, uniform, mode) and "
                    "diffusion.flow_shift, and its last level is pure noise already"
                )
        shift = diffusion.flow_shift
        return FlowMatching(
            diffusion.flow_sampling,
            diffusion.flow_weighting,
            float(bundle.noise_scheduler.config.shift) if shift is None else shift,
            diffusion.flow_shift_resolution,
            diffusion.flow_logit_mean,
            diffusion.flow_logit_std,
            diffusion.flow_mode_scale,
            diffusion.noise_offset,
            device,
            self.downsample_factor(bundle),
        ).configure(diffusion)  # diffusion.loss, huber_delta, input_perturbation

    def apply_diffusion_settings(self, bundle, diffusion) -> None:
        """diffusion.flow_shift is the sampler's shift too: a model samples as it was trained."""
        if diffusion.flow_shift is not None:
            config = dict(bundle.noise_scheduler.config)
            bundle.noise_scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                config, shift=diffusion.flow_shift
            )

    def set_dropout(self, bundle, p: float) -> None:
        """Dropout probability `p` after every attention and in every feed-forward."""
        for module in bundle.denoiser.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = p

    def make_sampler(self, bundle, name: str):
        """The flow-matching Euler sampler at the model's shift, for every evaluate.sampler
        (DDIM and DPM++ are DDPM's): what diffusers' StableDiffusion3Pipeline samples with."""
        return FlowSampler(
            FlowMatchEulerDiscreteScheduler.from_config(bundle.noise_scheduler.config)
        )

    # ------------------------------------------------------------ file layouts

    def check_export(self, bundle, fmt: str, base: str) -> None:
        if fmt not in ("single-file", "ckpt"):
            return
        if bundle.vae is None:
            raise UserError(
                f"--format {fmt}: {base} is a pixel-space model (no VAE) and has no SD3 "
                "single-file layout; export it with --format diffusers"
            )
        projection = bundle.modules["text_encoder"].text_projection.weight
        if projection.shape[0] != projection.shape[1]:
            raise UserError(
                f"--format {fmt}: {base}'s CLIP-L projects {projection.shape[1]} to "
                f"{projection.shape[0]} features; SD3 single files hold CLIP-L unprojected, "
                "which folds into the transformer only when both are alike: export it with "
                "--format diffusers"
            )

    def single_file_state(self, bundle) -> dict[str, torch.Tensor]:
        """The original SD 3.x layout that ComfyUI and diffusers' from_single_file read (an
        "incl_clips" file, see SINGLE_FILE_PREFIXES): the MMDiT under its original names
        (sd3_keys), the VAE under LDM's, CLIP-L, CLIP-G and T5 under transformers' names.

        Both readers use CLIP-L's pooled output unprojected (ComfyUI's SD3 clip_l has
        return_projected_pooled=False; diffusers sets its text_projection to the identity), so
        a CLIP-L projection P that is not the identity is folded into the transformer's
        pooled-text embedder (its CLIP-L columns W become W P) and written as the identity:
        the same model, up to rounding, in every reader."""
        from sdtune.checkpoint.convert import text_encoder_to_ldm, vae_to_ldm

        if bundle.vae is None:
            raise ValueError("a pixel-space model has no SD3 single-file layout")
        transformer, clip_l = unprojected_clip_l(bundle)
        prefix = SINGLE_FILE_PREFIXES
        state = {
            prefix["transformer"] + k: v
            for k, v in transformer_to_original(transformer, bundle.denoiser.config).items()
        }
        state.update(vae_to_ldm(bundle.vae.state_dict(), dict(bundle.vae.config)))
        state.update(text_encoder_to_ldm(clip_l, prefix["text_encoder"]))
        clip_g = bundle.modules["text_encoder_2"].state_dict()
        state.update(text_encoder_to_ldm(clip_g, prefix["text_encoder_2"]))
        if "text_encoder_3" in bundle.modules:  # a model without T5 has none in its file
            t5 = untied(bundle.modules["text_encoder_3"].state_dict())
            state.update({prefix["text_encoder_3"] + k: v for k, v in t5.items()})
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def lora_loader(self):
        from diffusers.loaders import SD3LoraLoaderMixin

        return SD3LoraLoaderMixin

    def read_lora_file(self, path: str, bundle):
        """A diffusers/peft LoRA file through SD3's loader (which keeps no network alphas), or
        a kohya-named one (sdtune's --format kohya, sd-scripts') converted by sd3_keys, whose
        alphas are folded into the weights: diffusers' SD3 loader reads no kohya names."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        kohya = tuple(f"{p}_" for p in self.kohya_prefixes.values())
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as fh:
                if any(k.startswith(kohya) for k in fh.keys()):
                    state = kohya_lora_to_peft(
                        load_file(path),
                        bundle.denoiser.config,
                        self.kohya_prefixes,
                        f"--lora {path}",
                    )
                    return state, None, None
        state, metadata = self.lora_loader().lora_state_dict(path, return_lora_metadata=True)
        return state, None, metadata

    def load_denoiser_lora(self, bundle, state, alphas, metadata, name: str) -> None:
        self.lora_loader().load_lora_into_transformer(
            state, bundle.denoiser, adapter_name=name, metadata=metadata
        )

    def kohya_refusal(self, bundle, variant: str) -> str | None:
        """A LoKr on a module the original MMDiT fuses (q, k, v into qkv) or reorders has no
        exact kohya form; LoRA and LoHa always have one."""
        from sdtune.models.lora import ADAPTER_MARKS, has_lora, lora_state

        if variant in ("lora", "loha") or not has_lora(bundle.denoiser):
            return None
        slots = module_map(bundle.denoiser.config)
        names = {k.rpartition(ADAPTER_MARKS[variant])[0] for k in lora_state(bundle.denoiser)}
        inexact = sorted(n for n in names if n in slots and not exact_on(slots[n], variant))
        if not inexact:
            return None
        return (
            f"an SD3 {variant} on {inexact[0]} has no kohya file that reads as trained: "
            "ComfyUI and kohya name SD3's q, k and v as one fused qkv, and a Kronecker product "
            "does not stack; export the merged model (--format single-file), or train "
            "lora.variant = 'lora' or 'loha'"
        )

    def kohya_modules(self, bundle, component, modules, alpha, variant):
        """The transformer's adapters under the original MMDiT names that ComfyUI's SD3 LoRA
        keys (lora_unet_<original module>) and kohya sd-scripts use, q/k/v fused exactly
        (sd3_keys.lora_to_original); the CLIP encoders' under their own (lora_te1_/lora_te2_)."""
        if component != self.denoiser:
            return super().kohya_modules(bundle, component, modules, alpha, variant)
        return lora_to_original(modules, bundle.denoiser.config, alpha, variant)

    def kohya_metadata(self, bundle) -> dict[str, str]:
        return {
            "ss_base_model_version": "sd3",
            "ss_v2": "False",
            "modelspec.architecture": "stable-diffusion-3-medium/lora",
        }

    def embedding_file(self, vectors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return keyed_embedding_file(EMBEDDING_KEYS, vectors)

    def read_embedding(self, state: dict, path: Path) -> dict[str, torch.Tensor]:
        """clip_l, clip_g and t5; a file learned without T5 holds no t5."""
        keys = {n: k for n, k in EMBEDDING_KEYS.items() if k in state or n in CLIP_ENCODERS}
        return read_keyed_embedding(keys, state, path, "an SD3")


def unprojected_clip_l(bundle) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(transformer state, CLIP-L state) with CLIP-L's projection P folded into the pooled-text
    embedder: pooled = [P h_l, h_g] enters as W pooled, so W's CLIP-L columns become W P (in
    float64) and P the identity. Unchanged when P is the identity already (SD3's own)."""
    transformer = dict(bundle.denoiser.state_dict())
    clip_l = dict(bundle.modules["text_encoder"].state_dict())
    projection = clip_l["text_projection.weight"]
    eye = torch.eye(projection.shape[0], dtype=projection.dtype, device=projection.device)
    if torch.equal(projection, eye):
        return transformer, clip_l
    key = "time_text_embed.text_embedder.linear_1.weight"
    weight, width = transformer[key], projection.shape[0]
    folded = (weight[:, :width].double() @ projection.double()).to(weight.dtype)
    transformer[key] = torch.cat([folded, weight[:, width:]], dim=1)
    clip_l["text_projection.weight"] = eye
    return transformer, clip_l


def untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict whose tied tensors are copies (safetensors holds no shared tensors). T5's
    encoder.embed_tokens is its shared table: both names are written, as diffusers'
    from_single_file (with transformers 5, which ties them only in from_pretrained) leaves a
    name it does not find on the meta device; ComfyUI's T5 reads shared.weight."""
    seen, out = set(), {}
    for key, tensor in state.items():
        out[key] = tensor.clone() if tensor.data_ptr() in seen else tensor
        seen.add(tensor.data_ptr())
    return out


class FlowSampler:
    """A FlowMatchEulerDiscreteScheduler with the two members sdtune's sampling loop asks every
    scheduler for: the initial noise's scale (1: the path ends at pure noise) and the model
    input's scaling (none)."""

    init_noise_sigma = 1.0

    def __init__(self, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        self.scheduler = scheduler

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample


# ---------------------------------------------------------------------- the tiny presets


def tiny_t5_tokenizer(max_length: int):
    """A T5 tokenizer at toy size, built here (Unigram over the tiny CLIP tokenizer's caption
    words and single characters, T5's <pad> 0, </s> 1, <unk> 2): no download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    from sdtune.models.tokenizer import WORDS

    chars = "abcdefghijklmnopqrstuvwxyz0123456789.,'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -1.0) for w in dict.fromkeys(WORDS)]
    pieces += [("▁", -3.0)] + [(c, -5.0) for c in chars]
    model = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=model,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=max_length,
    )


def tiny_encoders(max_length: int, widths: tuple[int, int], t5_width: int, layers: int):
    from transformers import T5Config

    from sdtune.models.tokenizer import build_tiny_tokenizer

    tokenizers = [build_tiny_tokenizer(max_length), build_tiny_tokenizer(max_length)]
    clip = [
        CLIPTextModelWithProjection(text_config(w, layers, 4, max_length, t))
        for w, t in zip(widths, tokenizers)
    ]
    t5_tokenizer = tiny_t5_tokenizer(max_length)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=t5_width,
            d_kv=t5_width // 4,
            d_ff=t5_width * 2,
            num_layers=layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return (*clip, t5), (*tokenizers, t5_tokenizer)


def tiny_transformer(in_channels: int, sample_size: int, joint: int, pooled: int, dropout: float):
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=joint,
        caption_projection_dim=64,
        pooled_projection_dim=pooled,
        pos_embed_max_size=sample_size,  # sides up to twice the default, as SD3's 192 for 128
        dual_attention_layers=(0,),  # SD 3.5's: both kinds of block are trained
        qk_norm="rms_norm",
    )
    for module in transformer.modules():  # model.dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    return transformer


def tiny_sd3(dropout: float = 0.0):
    """Every SD3 component at toy size: 32 px images, a 16-channel VAE with SD3's shift (4x
    down: 16x8x8 latents), an MMDiT of 2 layers (one with SD 3.5's dual attention, QK-norm),
    CLIP-L, CLIP-G and T5 encoders 32, 64 and 64 wide."""
    encoders, tokenizers = tiny_encoders(16, (32, 64), 64, 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    transformer = tiny_transformer(16, 8, 64, 32 + 64, dropout)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return SD3_CUSTOM.bundle(transformer, encoders, tokenizers, scheduler, vae, "preset:tiny-sd3")


def tiny_digits_sd3(dropout: float = 0.0):
    """The quickstart's digits in pixel space with SD3's parts: an MMDiT on 16x16 single-channel
    images (2 px patches: 64 image tokens), the three text encoders, flow matching at shift 1."""
    encoders, tokenizers = tiny_encoders(12, (32, 64), 64, 2)
    transformer = tiny_transformer(1, 16, 64, 32 + 64, dropout)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return PIXEL_SD3.bundle(
        transformer, encoders, tokenizers, scheduler, None, "preset:tiny-digits-sd3"
    )


SD3 = StableDiffusion3("sd3", "Stable Diffusion 3")
SD3_CUSTOM = StableDiffusion3("sd3-custom", "an SD3 layout of another size")
PIXEL_SD3 = StableDiffusion3("pixel-sd3", "a pixel-space model of the SD3 layout")
FAMILIES = (SD3, SD3_CUSTOM, PIXEL_SD3)
PRESETS = {"tiny-sd3": tiny_sd3, "tiny-digits-sd3": tiny_digits_sd3}
BY_NAME = {f.name: f for f in FAMILIES}


def sd3_variant(config: dict, has_vae: bool) -> str:
    if not has_vae:
        return "pixel-sd3"
    if (
        config.get("in_channels") == 16
        and config.get("patch_size") == 2
        and math.prod([config.get("num_attention_heads", 0), config.get("attention_head_dim", 0)])
        in (1536, 2432)
    ):  # 3 / 3.5 Medium (24 heads), 3.5 Large (38 heads) of 64
        return "sd3"
    return "sd3-custom"


def family_of_folder(path: Path, info: dict):
    """The variant of a diffusers folder of the SD3 layout (None: not SD3)."""
    config_file = path / "transformer" / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"model.base: {config_file} is unreadable ({exc})") from None
    if not isinstance(config, dict) or config.get("_class_name") != "SD3Transformer2DModel":
        return None
    recorded = info.get("family")
    if recorded in BY_NAME:
        return BY_NAME[recorded]
    return BY_NAME[sd3_variant(config, (path / "vae" / "config.json").is_file())]
