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


def add_tokens(bundle: ModelBundle, token: str, vectors: dict[str, torch.Tensor]) -> None:
    """Add `token` to every text encoder and its tokenizer, with the vectors given for each
    (`vectors`: text-encoder component -> N x width; the same N for all)."""
    vectors = {k: v for k, v in vectors.items() if k not in bundle.left_out}  # e.g. no T5
    counts = {v.shape[0] for v in vectors.values()}
    if len(counts) != 1 or set(vectors) != set(bundle.text_encoders):
        raise UserError(
            f"token {token!r}: vectors for {sorted(vectors)}, but this model's text encoders are "
            f"{list(bundle.text_encoders)} (with as many vectors for each)"
        )
    names = token_names(token, counts.pop())
    for component, encoder in bundle.text_encoders.items():
        _add_to(bundle.tokenizers[component], encoder, token, names, vectors[component])
    bundle.extra_tokens[token] = len(names)


def _add_to(tokenizer, encoder, token: str, names: list[str], vectors: torch.Tensor) -> None:
    vocab = tokenizer.get_vocab()
    known = [n for n in names if n in vocab or f"{n}</w>" in vocab]  # CLIP marks word ends
    if known or len(tokenizer(token, add_special_tokens=False).input_ids) == 1:
        raise ConfigError(
            f"textual_inversion.token: {token!r} is already in the tokenizer's vocabulary; "
            "choose a new token such as '<my-subject>'"
        )
    added = tokenizer.add_tokens(names, special_tokens=False)
    if added != len(names):
        raise ConfigError(f"textual_inversion.token: could not add {token!r} to the tokenizer")
    ids = tokenizer.convert_tokens_to_ids(names)
    base = encoder.get_input_embeddings()
    if isinstance(base, ExtendedEmbedding):  # a second token: fold the first into the base
        base = _folded(base)
    if ids != list(range(base.num_embeddings, base.num_embeddings + len(names))):
        raise ConfigError(
            f"textual_inversion.token: the tokenizer gave {token!r} ids {ids}, not the next rows "
            f"after its {base.num_embeddings} embeddings; the tokenizer and text encoder disagree"
        )
    encoder.set_input_embeddings(ExtendedEmbedding(base, vectors.to(base.weight)))
    encoder.config.vocab_size = base.num_embeddings + len(names)


def _folded(ext: ExtendedEmbedding) -> torch.nn.Embedding:
    table = torch.nn.Embedding(ext.num_embeddings, ext.embedding_dim)
    table.weight.data.copy_(ext.weight.detach())
    table.weight.requires_grad_(False)
    return table.to(ext.base.weight.device)


def add_trainable_token(bundle: ModelBundle, token: str, init_word: str, num_vectors: int) -> None:
    """Textual inversion's setup: the new vectors start as `init_word`'s embedding, in every
    text encoder."""
    vectors = {}
    for component, encoder in bundle.text_encoders.items():
        ids = bundle.tokenizers[component](init_word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ConfigError(
                f"textual_inversion.init_word: {init_word!r} is {len(ids)} tokens for this "
                "tokenizer; choose a word that is a single token (e.g. the class noun)"
            )
        table = encoder.get_input_embeddings().weight.detach()
        vectors[component] = table[ids[0]].repeat(num_vectors, 1)
    add_tokens(bundle, token, vectors)


def token_vectors(bundle: ModelBundle) -> list[torch.nn.Parameter]:
    """The new tokens' vectors, one parameter per text encoder (what textual inversion trains)."""
    tables = [e.get_input_embeddings() for e in bundle.text_encoders.values()]
    return [t.vectors for t in tables if isinstance(t, ExtendedEmbedding)]


def merge_tokens(bundle: ModelBundle) -> None:
    """Replace the wrapped tables by plain nn.Embeddings holding the new rows (for export)."""
    for encoder in bundle.text_encoders.values():
        table = encoder.get_input_embeddings()
        if isinstance(table, ExtendedEmbedding):
            encoder.set_input_embeddings(_folded(table))


def learned_vectors(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The learned vectors of each text encoder (component -> N x width)."""
    out = {}
    for component, encoder in bundle.text_encoders.items():
        table = encoder.get_input_embeddings()
        if not isinstance(table, ExtendedEmbedding):
            raise UserError("this model has no learned textual-inversion token")
        out[component] = table.vectors.detach().cpu().float().contiguous()
    return out


def read_embedding_file(bundle: ModelBundle, path: Path) -> dict[str, torch.Tensor]:
    """Vectors per text encoder from an embedding file in the layout of the bundle's family
    (AUTOMATIC1111/ComfyUI .safetensors or .pt, or diffusers' learned_embeds)."""
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
    if not isinstance(state, dict):
        raise UserError(f"--embedding {path}: not an embedding file (no named tensors)")
    vectors = bundle.arch.read_embedding(state, path)
    for component, got in vectors.items():
        if got.ndim != 2 or got.shape[0] == 0 or got.shape[1] == 0:
            raise UserError(
                f"--embedding {path}: {component}'s vectors have shape {list(got.shape)}; an "
                "embedding holds one or more vectors of the text encoder's width"
            )
        if not torch.isfinite(got).all():
            raise UserError(f"--embedding {path}: {component}'s vectors hold NaN or infinity")
    counts = {got.shape[0] for got in vectors.values()}
    if len(counts) > 1:
        raise UserError(
            f"--embedding {path}: the text encoders' parts have different numbers of vectors "
            f"({', '.join(f'{c}: {v.shape[0]}' for c, v in vectors.items())}); they must match"
        )
    return vectors


def load_embedding_file(bundle: ModelBundle, path: Path, token: str) -> None:
    vectors = read_embedding_file(bundle, path)
    for component, encoder in bundle.text_encoders.items():
        width = encoder.get_input_embeddings().weight.shape[1]
        got = vectors.get(component)
        if got is None or got.shape[1] != width:
            shape = "none" if got is None else f"vectors of width {got.shape[1]}"
            raise UserError(
                f"--embedding {path}: {shape} for {component}, whose embeddings are {width} "
                "wide (an embedding for another model family?)"
            )
    add_tokens(bundle, token, vectors)
    for vector in token_vectors(bundle):
        vector.requires_grad_(False)
