"""A word-level tokenizer with a small vocabulary, for the project's own tiny CLIPs.

The full 49,408-token BPE vocabulary makes a tiny CLIP mostly token embedding (35 MB);
a few hundred words cover the demo captions and prompt templates. Unknown words map to
``<unk>``. The end-of-text token has the highest id, so open_clip's argmax pooling finds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
PAD, UNK, SOT, EOT = "<pad>", "<unk>", "<start_of_text>", "<end_of_text>"


def split_words(text: str) -> list[str]:
    """Lower-case words, numbers and single punctuation marks."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """Maps text to fixed-length id tensors: ``<sot> words... <eot>`` then zero padding."""

    kind = "word"

    def __init__(self, words: list[str], context_length: int = 32):
        self.words = list(words)
        self.context_length = int(context_length)
        vocab = [PAD, UNK, *self.words, SOT, EOT]
        self.ids = {w: i for i, w in enumerate(vocab)}
        self.vocab_size = len(vocab)
        self.sot_id, self.eot_id = self.ids[SOT], self.ids[EOT]

    @classmethod
    def from_corpus(cls, texts: Iterable[str], context_length: int = 32) -> "WordTokenizer":
        """Build the vocabulary from every word that appears in ``texts`` (sorted, deterministic)."""
        words = sorted({w for t in texts for w in split_words(t)})
        return cls(words, context_length)

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.ids.get(w, self.ids[UNK]) for w in split_words(text)][: length - 2]
            ids = [self.sot_id, *ids, self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def unknown_words(self, text: str) -> list[str]:
        """Words of ``text`` this vocabulary does not know (they would all read as ``<unk>``)."""
        return [w for w in split_words(text) if w not in self.ids]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "words": self.words, "context_length": self.context_length}

    @classmethod
    def from_dict(cls, spec: dict) -> "WordTokenizer":
        return cls(spec["words"], spec.get("context_length", 32))
