"""A small CLIP tokenizer built locally, for the tiny presets (no hub download).

Written by hand because no library learns a CLIP BPE vocabulary deterministically offline:
the merges are learned on a fixed list of common caption words, so each of those words is one
token; the vocabulary also holds the 256 byte-level symbols alone and as word ends, so any text
is encodable; CLIP's two special tokens close it.
"""

from __future__ import annotations

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


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable characters."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


@lru_cache(maxsize=1)
def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of the tiny tokenizer: byte-pair encoding learned on WORDS.

    Plain BPE (Sennrich et al. 2016) with ties broken by the pair itself, so the result is the
    same in every process (the `tokenizers` trainer breaks ties by hash order).
    """
    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for symbol in alphabet + [a + "</w>" for a in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in dict.fromkeys(WORDS)]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for word in words:
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for i, word in enumerate(words):
            j, merged = 0, []
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                    merged.append(word[j] + word[j + 1])
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            words[i] = merged
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def build_tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer over `tiny_vocab()`, padding/truncating to `max_length` tokens."""
    vocab, merges = tiny_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
