"""The fast-path switches of `train.*` (TF32, attention kernel, channels-last, torch.compile),
checked before any work and applied to the UNet the loop trains."""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager, nullcontext

import torch

from sdtune.config import TrainConfig
from sdtune.errors import ConfigError

GPU_ONLY_ATTENTION = ("efficient", "cudnn", "xformers")


def check_speed_options(cfg: TrainConfig, cuda: bool) -> None:
    """A one-line error for a switch this machine cannot honour (before any model is loaded)."""
    if cfg.attention in GPU_ONLY_ATTENTION and not cuda:
        raise ConfigError(
            f"train.attention='{cfg.attention}' needs a CUDA GPU; on CPU use 'sdpa', 'flash' or 'math'"
        )
    if cfg.attention == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ConfigError(
            "train.attention='xformers' needs xformers, which is not installed (pip install "
            "xformers), or use 'sdpa' (PyTorch's flash attention, as fast on recent GPUs)"
        )
    if cfg.optimizer == "adamw8bit":
        from sdtune.train.optim import require_bitsandbytes

        require_bitsandbytes()


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions (Ampere and newer)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def attention_kernel(cfg: TrainConfig) -> AbstractContextManager:
    """The context the training forward runs in: one forced SDPA backend, or PyTorch's choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }
    if cfg.attention in backends:
        return sdpa_kernel([backends[cfg.attention]])
    return nullcontext()  # sdpa: PyTorch picks; xformers: set on the UNet's processors


def prepare_denoiser(denoiser: torch.nn.Module, cfg: TrainConfig) -> None:
    """Switches that change the denoiser module itself (before Accelerate wraps it)."""
    if cfg.attention == "xformers":
        denoiser.enable_xformers_memory_efficient_attention()
    if cfg.channels_last:
        denoiser.to(memory_format=torch.channels_last)


def training_forward(denoiser: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """The module the training step calls: the (wrapped) denoiser, compiled when asked. Sampling
    and validation call the plain one, so other shapes never trigger a recompilation."""
    return torch.compile(denoiser) if cfg.compile else denoiser
