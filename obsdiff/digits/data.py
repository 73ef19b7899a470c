"""The digits world the shipped default pipeline lives in: images, prompts and the tokenizer vocabulary.

scikit-learn's ``load_digits`` gives 1,797 real 8×8 handwritten digits; they are upsampled to
``IMAGE_SIZE`` and paired with prompts in several phrasings.  Everything here is deterministic so the
training script, the judge and the evaluation agree on what "a seven" looks like.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Phrasings used in training. ``{w}`` is the word ("seven"), ``{n}`` the numeral ("7").
TRAIN_TEMPLATES = (
    "a handwritten digit {w}",
    "the number {w} written by hand",
    "a drawing of the digit {n}",
    "handwritten {n}",
    "an image of a {w}",
    "digit {w}",
    "a photo of the number {n}",
    "a sketch of a handwritten {w}",
)
# The phrasing the judge's conditional accuracy is measured with.
EVAL_TEMPLATE = "a handwritten digit {w}"

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def prompt_for(digit: int, template: str = EVAL_TEMPLATE) -> str:
    return template.format(w=DIGIT_WORDS[digit], n=str(digit))


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits as float images in [-1, 1], shape (N, 1, size, size), with integer labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1, torch.from_numpy(data.target.astype(np.int64))


def split_indices(n: int, held_out_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed train / held-out split used by both the judge and the generator."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * (1 - held_out_fraction)))
    return np.sort(order[:cut]), np.sort(order[cut:])


# ---------------------------------------------------------------------------------------------
# A CLIP byte-level BPE vocabulary written by the project.
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-character map (same table as the reference tokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one pre-tokenized word (the last symbol carries ``</w>``)."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, 1 << 30))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def vocabulary_words() -> list[str]:
    words: set[str] = set()
    for digit in range(10):
        for template in (*TRAIN_TEMPLATES, EVAL_TEMPLATE):
            words.update(prompt_for(digit, template).split())
    return sorted(words)


def build_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges such that every word in ``words`` encodes to exactly one token.

    Merges are appended with the lowest priority, so a merge added for a later word never changes
    how an earlier word is split (the earlier word always has a higher-priority pair available).
    """
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(symbols := _bpe(word, ranks)) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab_list.append(pair[0] + pair[1])
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    for word in words:
        assert _bpe(word, ranks) == [word + "</w>"], word
    return vocab, merges


def write_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_bpe(vocabulary_words())
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return vocab_path, merges_path
