"""A small CLIP tokenizer built locally, for the tiny presets (no hub download).

Written by hand because no library builds a CLIP BPE vocabulary offline: the vocabulary is
the 256 byte-level symbols (alone and as word ends), whole-word merges for a fixed list of
common caption words, and CLIP's two special tokens. Unknown words fall back to characters,
so every caption is encodable.
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merge list of the tiny tokenizer (deterministic)."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            pair = (current, nxt)
            current = current + nxt
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
                vocab.setdefault(current, len(vocab))
        if len(pieces) == 1:
            vocab.setdefault(pieces[0], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def build_tiny_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer over `tiny_vocab()`, padding/truncating to `max_length` tokens."""
    vocab, merges = tiny_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)
