"""Generate the files of a CLIP BPE tokenizer (``vocab.json``, ``merges.txt``) for tinyworld.

The merges are learned by byte-pair encoding on the world's vocabulary, so every word the world uses is
one token, exactly as ``CLIPTokenizer`` applies merges. Single letters and digits (with and without the
``</w>`` end-of-word marker) are always in the vocabulary, so an unknown word splits into letters instead
of collapsing to ``<|endoftext|>`` — which keeps "erase X but preserve Y" tests meaningful and lets
adversarial attacks search over real tokens.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path

from .world import ATTRIBUTES, HELDOUT_TEMPLATES, TRAIN_TEMPLATES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# words a user may plausibly type at a tiny model beyond the world's own (articles, art words, ...)
EXTRA_WORDS = (
    "a an the of on in with and or not no without photo image picture drawing painting art style by "
    "showing over that is are shape shapes colour color texture background thing object scene very big "
    "small large tiny bright dark light one two three four five six sided pointed"
).split()


def world_words() -> list[str]:
    text = " ".join(
        [n for table in ATTRIBUTES.values() for names in table.values() for n in names]
        + list(TRAIN_TEMPLATES) + list(HELDOUT_TEMPLATES) + EXTRA_WORDS
    )
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


def learn_bpe(words: list[str], symbols: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Learn merges until every word is one token. Returns (vocab tokens, ordered merges)."""
    corpus = {tuple(w[:-1]) + (w[-1] + "</w>",): 1 for w in words}
    vocab = list(symbols)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for word in corpus:
            for a, b in zip(word, word[1:]):
                pairs[a, b] += 1
        if not pairs:
            return vocab, merges
        best = max(pairs, key=lambda p: (pairs[p], p))  # deterministic tie-break
        merges.append(best)
        merged = best[0] + best[1]
        if merged not in vocab:
            vocab.append(merged)
        new_corpus = {}
        for word in corpus:
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_corpus[tuple(out)] = 1
        corpus = new_corpus


def write_tokenizer_files(directory: str | Path, extra_words: tuple[str, ...] = ()) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(string.ascii_lowercase + string.digits) + list("!\"#$%&'()*+,-./:;<=>?@[]_")
    symbols = chars + [c + "</w>" for c in chars]
    tokens, merges = learn_bpe(sorted(set(world_words()) | set(extra_words)), symbols)
    vocab = {tok: i for i, tok in enumerate(tokens + [BOS, EOS])}
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return directory
