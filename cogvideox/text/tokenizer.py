"""The T5 tokenizer: text to the ids (and mask) that the T5 encoder reads, equal to the reference's.

The reference is ``transformers.T5Tokenizer`` (5.x: a ``tokenizers`` Unigram pipeline built from ``spiece.model``
or ``tokenizer.json``), called by the CogVideoX pipelines with ``padding="max_length", max_length=226,
truncation=True``. For one prompt it does, in order:

1. cut out the added tokens written in the raw text (``</s>``, ``<pad>``, ``<unk>``, ``<extra_id_N>``): each becomes
   its own id, leftmost-longest match, before any normalization (the reference's added tokens are not normalized);
2. normalize every other stretch with the sentencepiece character map (NFKC-like: full-width to ASCII, ligatures);
3. split it on Unicode whitespace (Rust's ``char::is_whitespace``: spaces, tabs, newlines, NBSP, ... are dropped),
   put ``▁`` before every word and split again before every ``▁`` (``Metaspace``, ``prepend_scheme="always"``:
   text right after an added token also starts a word);
4. segment every piece with the Unigram Viterbi search (unknown characters score ``min_score - 10`` and runs of
   them fuse into one ``<unk>``);
5. append ``</s>``; truncate to ``max_length - 1`` tokens before appending it; pad with ``<pad>`` (id 0) on the
   right. The mask is 1 on every token that is not padding, including ``</s>`` and a ``<pad>`` written in the text.

Prompts longer than ``max_length`` lose their tail, and a warning quotes the dropped text (as the pipeline does).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ..loading import component_folder
from .vocab import EOS_TOKEN, PAD_TOKEN, UnigramVocab, load_vocab

logger = logging.getLogger(__name__)

METASPACE = "\u2581"  # "▁": sentencepiece's visible word-start marker
# Rust's char::is_whitespace, i.e. the Unicode White_Space property, which the reference's WhitespaceSplit uses.
# (Python's str.isspace differs: it also counts U+001C..U+001F, which the reference keeps as text.)
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)
# The reference's Unigram scores a character no piece covers as the lowest piece score minus this.
UNKNOWN_PENALTY = 10.0
DEFAULT_MAX_LENGTH = 226  # what the CogVideoX pipelines pass (max_sequence_length)


@dataclasses.dataclass(frozen=True)
class TokenizedText:
    """Token ids and attention mask of a batch of prompts.

    Attributes:
        input_ids: ``[B, L]`` int64, padded with the pad id (0) on the right.
        attention_mask: ``[B, L]`` int64, 1 on tokens (including ``</s>``), 0 on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def split_words(text: str) -> list[str]:
    """Split on Unicode whitespace and before every ``▁``; every part starts with ``▁`` (reference pre-tokenizer)."""
    parts: list[str] = []
    for word in "".join(" " if ch in WHITESPACE else ch for ch in text).split(" "):
        if not word:
            continue
        if not word.startswith(METASPACE):
            word = METASPACE + word
        # "▁a▁b" -> "▁a", "▁b"; "▁▁a" -> "▁", "▁a" (each marker stays with what follows it)
        parts.extend(METASPACE + rest for rest in word.split(METASPACE)[1:])
    return parts


class T5Tokenizer:
    """Sentencepiece-Unigram tokenizer of T5, equal to ``transformers.T5Tokenizer`` (see the module docstring).

    Build it with :meth:`from_pretrained`; call it on a prompt or a list of prompts.
    """

    def __init__(self, vocab: UnigramVocab) -> None:
        self.vocab = vocab
        self._piece_ids = {piece: i for i, piece in enumerate(vocab.pieces)}
        self._scores = vocab.scores
        self._max_piece_chars = max(len(piece) for piece in vocab.pieces)
        self._unk_score = min(vocab.scores) - UNKNOWN_PENALTY
        # Leftmost-longest matching of the added tokens: at each position, try the longest first.
        self._added_by_length = sorted(vocab.added_tokens, key=len, reverse=True)
        self._added_first_chars = frozenset(token[0] for token in vocab.added_tokens)
        self.pad_token_id = vocab.added_tokens[PAD_TOKEN]
        self.eos_token_id = vocab.added_tokens[EOS_TOKEN]
        self.unk_token_id = vocab.unk_id
        self.model_max_length = vocab.model_max_length

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, **hub_kwargs) -> T5Tokenizer:
        """Read a ``tokenizer/`` folder, a pipeline folder that contains one, or a hub id.

        The folder holds ``spiece.model`` (or the ``tokenizer.json`` that transformers 5 saves) and optionally
        ``tokenizer_config.json`` (``extra_ids``, ``model_max_length``). ``hub_kwargs``: ``revision``,
        ``cache_dir``, ``local_files_only``.
        """
        return cls(load_vocab(component_folder(path_or_hub_id, "tokenizer", **hub_kwargs)))

    @property
    def vocab_size(self) -> int:
        """Number of ids, sentinels included (32100 for T5; the encoder's embedding has 32128 rows)."""
        return len(self.vocab.pieces)

    def __repr__(self) -> str:
        return f"T5Tokenizer(vocab_size={self.vocab_size}, source={self.vocab.source!r})"

    # ------------------------------------------------------------------------------------------- encoding

    def _split_added(self, text: str) -> list[tuple[str, int | None]]:
        """Cut the added tokens out of the raw text: ``[(stretch, None) | (token, id)]`` in order."""
        out: list[tuple[str, int | None]] = []
        start = i = 0
        while i < len(text):
            if text[i] in self._added_first_chars:
                token = next((t for t in self._added_by_length if text.startswith(t, i)), None)
                if token is not None:
                    if start < i:
                        out.append((text[start:i], None))
                    out.append((token, self.vocab.added_tokens[token]))
                    i = start = i + len(token)
                    continue
            i += 1
        if start < len(text):
            out.append((text[start:], None))
        return out

    def _viterbi(self, word: str) -> list[int]:
        """Best-scoring segmentation of one ``▁``-prefixed word into piece ids (the reference Unigram's search:
        on equal scores the first-found, shorter, piece wins; runs of unknown characters fuse into one unk id)."""
        n = len(word)
        best = [0.0] * (n + 1)
        start = [-1] * (n + 1)  # where the best piece ending here starts (-1: nothing reaches here yet)
        piece = [-1] * (n + 1)
        for i in range(n):
            base = best[i]
            covers_one_char = False
            for j in range(i + 1, min(n, i + self._max_piece_chars) + 1):
                pid = self._piece_ids.get(word[i:j])
                if pid is None:
                    continue
                score = base + self._scores[pid]
                if start[j] < 0 or score > best[j]:
                    best[j], start[j], piece[j] = score, i, pid
                covers_one_char = covers_one_char or j == i + 1
            if not covers_one_char:
                score = base + self._unk_score
                if start[i + 1] < 0 or score > best[i + 1]:
                    best[i + 1], start[i + 1], piece[i + 1] = score, i, self.unk_token_id
        ids: list[int] = []
        end = n
        while end > 0:
            pid = piece[end]
            if not (pid == self.unk_token_id and ids and ids[-1] == self.unk_token_id):
                ids.append(pid)
            end = start[end]
        ids.reverse()
        return ids

    def encode(self, text: str) -> list[int]:
        """The ids of one prompt with ``</s>`` appended, neither truncated nor padded."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a str, got {type(text).__name__}: {text!r}")
        ids: list[int] = []
        for stretch, token_id in self._split_added(text):
            if token_id is not None:
                ids.append(token_id)
                continue
            for word in split_words(self.vocab.normalize(stretch)):
                ids.extend(self._viterbi(word))
        ids.append(self.eos_token_id)
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids`` (special tokens kept, ``▁`` read as a space); used to quote truncated text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:10]} are outside the vocabulary [0, {self.vocab_size})")
        return "".join(self.vocab.pieces[i] for i in ids).replace(METASPACE, " ").strip(" ")

    def __call__(self, texts: str | Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> TokenizedText:
        """Tokenize, truncate and pad to exactly ``max_length`` tokens.

        Args:
            texts: one prompt or a list of prompts (an empty prompt gives just ``</s>``).
            max_length: length of every row, ``</s>`` included; at least 2.

        Returns:
            :class:`TokenizedText` with ``input_ids`` and ``attention_mask`` of shape ``[B, max_length]``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not texts:
            raise TypeError(f"texts must be a str or a non-empty list of str, got {texts!r}")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{index}] is {text!r} ({type(text).__name__}); every prompt must be a str")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r}: must be an integer >= 2 (at least one token and </s>)")

        input_ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > max_length:
                dropped = ids[max_length - 1 : -1]
                logger.warning(
                    "prompt %d has %d tokens but max_length=%d: the end of it was dropped: %r",
                    row,
                    len(ids),
                    max_length,
                    self.decode(dropped),
                )
                ids = ids[: max_length - 1] + [self.eos_token_id]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return TokenizedText(input_ids=input_ids, attention_mask=attention_mask)
