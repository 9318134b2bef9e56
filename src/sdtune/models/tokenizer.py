"""A small CLIP tokenizer built locally, for the tiny presets (no hub download).

The merges are learned by the `tokenizers` BPE trainer on a fixed list of common caption
words, so each of those words is one token; the vocabulary also holds the 256 byte-level
symbols alone and as word ends, so any text is encodable; CLIP's two special tokens close it.
"""

from __future__ import annotations

import json
from functools import lru_cache

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Words that become single tokens; anything else is spelled out in byte-level characters.
WORDS = """
a an the of in on at with and or to for by from is are this that photo picture image painting
drawing sketch render portrait close up style art digital oil watercolor black white red green
blue yellow orange purple pink brown gray grey dark light bright small large big tall short
old young man woman person people child boy girl dog cat bird horse car house tree flower
mountain river lake sea sky city street forest field beach snow rain sun moon night day
handwritten digit number zero one two three four five six seven eight nine ten sks ohwx
face eyes hair hand standing sitting smiling wearing shirt dress hat background studio
high quality detailed blurry sharp simple pattern texture logo icon shape circle square
""".split()


@lru_cache(maxsize=1)
def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merge list of the tiny tokenizer (deterministic)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        min_frequency=1,
        end_of_word_suffix="</w>",
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(WORDS, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    for symbol in alphabet:  # every byte may end a word
        vocab.setdefault(symbol, len(vocab))
        vocab.setdefault(symbol + "</w>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges  # type: ignore[return-value]


def build_tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer over `tiny_vocab()`, padding/truncating to `max_length` tokens."""
    vocab, merges = tiny_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
