"""Textual inversion: new tokens whose embedding vectors are the only thing trained.

The text encoder's token embedding is wrapped so that the base table stays frozen (and is not
copied into checkpoints) while the new vectors are one small trainable parameter. A token
with several vectors is written `<tok>` in prompts and expands to `<tok> <tok>_1 ...`, the
convention of diffusers' `load_textual_inversion` and AUTOMATIC1111.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from sdtune.errors import ConfigError, UserError
from sdtune.models.bundle import ModelBundle

A1111_KEY = "emb_params"  # AUTOMATIC1111's safetensors embedding key; diffusers reads it too


class ExtendedEmbedding(torch.nn.Module):
    """A frozen token table plus trainable rows appended after it (the new tokens' vectors)."""

    def __init__(self, base: torch.nn.Embedding, vectors: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.vectors = torch.nn.Parameter(vectors.clone())

    @property
    def weight(self) -> torch.Tensor:  # what callers of get_input_embeddings().weight expect
        return torch.cat([self.base.weight, self.vectors.to(self.base.weight.dtype)])

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.vectors.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


def token_names(token: str, num_vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_prompt(prompt: str, tokens: dict[str, int]) -> str:
    """'<tok> dog' -> '<tok> <tok>_1 <tok>_2 dog' for a token learned with three vectors."""
    for token, n in tokens.items():
        if n > 1 and token in prompt:
            prompt = prompt.replace(token, " ".join(token_names(token, n)))
    return prompt


def add_tokens(bundle: ModelBundle, token: str, vectors: torch.Tensor) -> None:
    """Add `token` (with len(vectors) vectors) to the tokenizer and the text encoder."""
    names = token_names(token, vectors.shape[0])
    vocab = bundle.tokenizer.get_vocab()
    known = [n for n in names if n in vocab or f"{n}</w>" in vocab]  # CLIP marks word ends
    if known or len(bundle.tokenizer(token, add_special_tokens=False).input_ids) == 1:
        raise ConfigError(
            f"textual_inversion.token: {token!r} is already in the tokenizer's vocabulary; "
            "choose a new token such as '<my-subject>'"
        )
    added = bundle.tokenizer.add_tokens(names, special_tokens=False)
    if added != len(names):
        raise ConfigError(f"textual_inversion.token: could not add {token!r} to the tokenizer")
    ids = bundle.tokenizer.convert_tokens_to_ids(names)
    base = bundle.text_encoder.get_input_embeddings()
    if isinstance(base, ExtendedEmbedding):  # a second token: fold the first into the base
        base = _folded(base)
    if ids != list(range(base.num_embeddings, base.num_embeddings + len(names))):
        raise ConfigError(
            f"textual_inversion.token: the tokenizer gave {token!r} ids {ids}, not the next rows "
            f"after its {base.num_embeddings} embeddings; the tokenizer and text encoder disagree"
        )
    bundle.text_encoder.set_input_embeddings(ExtendedEmbedding(base, vectors.to(base.weight)))
    bundle.text_encoder.config.vocab_size = base.num_embeddings + len(names)
    bundle.extra_tokens[token] = len(names)


def _folded(ext: ExtendedEmbedding) -> torch.nn.Embedding:
    table = torch.nn.Embedding(ext.num_embeddings, ext.embedding_dim)
    table.weight.data.copy_(ext.weight.detach())
    table.weight.requires_grad_(False)
    return table.to(ext.base.weight.device)


def add_trainable_token(bundle: ModelBundle, token: str, init_word: str, num_vectors: int) -> None:
    """Textual inversion's setup: the new vectors start as `init_word`'s embedding."""
    ids = bundle.tokenizer(init_word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ConfigError(
            f"textual_inversion.init_word: {init_word!r} is {len(ids)} tokens for this tokenizer; "
            "choose a word that is a single token (e.g. the class noun)"
        )
    table = bundle.text_encoder.get_input_embeddings().weight.detach()
    add_tokens(bundle, token, table[ids[0]].repeat(num_vectors, 1))


def merge_tokens(bundle: ModelBundle) -> None:
    """Replace the wrapped table by a plain nn.Embedding holding the new rows (for export)."""
    table = bundle.text_encoder.get_input_embeddings()
    if isinstance(table, ExtendedEmbedding):
        bundle.text_encoder.set_input_embeddings(_folded(table))


def learned_vectors(bundle: ModelBundle) -> torch.Tensor:
    table = bundle.text_encoder.get_input_embeddings()
    if not isinstance(table, ExtendedEmbedding):
        raise UserError("this model has no learned textual-inversion token")
    return table.vectors.detach().cpu().float().contiguous()


def read_embedding_file(path: Path) -> torch.Tensor:
    """Vectors (N x dim) from an A1111 .safetensors/.pt embedding or a diffusers learned_embeds."""
    if not path.is_file():
        raise UserError(f"--embedding {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"--embedding {path}: cannot read it ({exc})") from None
    if isinstance(state, dict) and "string_to_param" in state:  # A1111 .pt
        state = state["string_to_param"]
    if isinstance(state, dict) and A1111_KEY in state:
        state = {A1111_KEY: state[A1111_KEY]}
    if not isinstance(state, dict) or len(state) != 1:
        raise UserError(
            f"--embedding {path}: expected one tensor (emb_params, string_to_param or a "
            "single token), found keys {sorted(state)[:4] if isinstance(state, dict) else state}"
        )
    vectors = next(iter(state.values())).detach().float()
    return vectors.reshape(-1, vectors.shape[-1])


def load_embedding_file(bundle: ModelBundle, path: Path, token: str) -> None:
    vectors = read_embedding_file(path)
    width = bundle.text_encoder.get_input_embeddings().weight.shape[1]
    if vectors.shape[1] != width:
        raise UserError(
            f"--embedding {path}: vectors of width {vectors.shape[1]}, but this text encoder's "
            f"embeddings are {width} wide (an embedding for another model family?)"
        )
    add_tokens(bundle, token, vectors)
    bundle.text_encoder.get_input_embeddings().vectors.requires_grad_(False)
