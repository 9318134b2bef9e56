"""Turn a loaded base model into the model a config trains: new tokens, freezing, adapters.

The loop and every reader of a checkpoint (export, eval, sample) call `prepare_model`, so a
checkpoint's parameter names always mean the same thing.
"""

from __future__ import annotations

from sdtune.config import RunConfig
from sdtune.errors import ConfigError
from sdtune.models.bundle import ModelBundle
from sdtune.models.freezing import FreezeReport, apply_freezing, count_parameters
from sdtune.models.lora import is_adapter_weight


def prepare_model(bundle: ModelBundle, cfg: RunConfig) -> FreezeReport:
    """Textual-inversion token, then freezing by pattern, then LoRA; returns the count table."""
    ti = cfg.textual_inversion
    if ti.token is not None:
        from sdtune.models.embeddings import add_trainable_token

        add_trainable_token(bundle, ti.token, ti.init_word, ti.num_vectors)
    if cfg.lora.enabled:
        from sdtune.models.lora import add_lora

        add_lora(bundle, cfg.lora)
    # peft freezes everything but the adapters; the patterns then choose base weights to train too
    apply_freezing(bundle, cfg.model.trainable, cfg.model.frozen)
    for module in bundle.components().values():
        for name, param in module.named_parameters():
            if is_adapter_weight(name):
                param.requires_grad_(True)
    if ti.token is not None:
        from sdtune.models.embeddings import token_vectors

        for vector in token_vectors(bundle):
            vector.requires_grad_(True)
    report = count_parameters(bundle)
    if report.trainable == 0:
        raise ConfigError(
            "model.trainable: no parameter is trainable (check model.trainable/model.frozen, "
            "or enable lora or textual_inversion)"
        )
    return report
