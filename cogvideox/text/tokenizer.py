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

Prompts longer than ``max_length`` lose their tail, and a warning quotes the dropped words as written in the prompt
(a word cut inside is quoted whole), and the dropped tokens' text as the diffusers pipeline's warning does.

The bundled demo model's tokenizer also warns, once per process, about words outside its tiny vocabulary
(:mod:`cogvideox.demo.prompts`), through :attr:`T5Tokenizer.check_prompts`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Sequence
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
_WORD = re.compile(f"[^{re.escape(''.join(sorted(WHITESPACE)))}]+")  # a word as written: a run of non-whitespace
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

    Attributes:
        check_prompts: called with the prompts of every call before they are tokenized, or None. The bundled demo
            model's tokenizer sets it (by :meth:`from_pretrained`) to warn about words the demo does not know.
    """

    def __init__(self, vocab: UnigramVocab, *, check_prompts: Callable[[Sequence[str]], None] | None = None) -> None:
        self.vocab = vocab
        self.check_prompts = check_prompts
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
        ``cache_dir``, ``local_files_only``, ``token``.
        """
        folder = component_folder(path_or_hub_id, "tokenizer", **hub_kwargs)
        vocab = load_vocab(folder)
        return cls(vocab, check_prompts=_demo_prompt_check(folder, vocab))

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

        if self.check_prompts is not None:
            self.check_prompts(texts)
        input_ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > max_length:
                logger.warning("%s", self._truncation_message(row, text, ids, max_length))
                ids = ids[: max_length - 1] + [self.eos_token_id]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return TokenizedText(input_ids=input_ids, attention_mask=attention_mask)

    def _truncation_message(self, row: int, text: str, ids: list[int], max_length: int) -> str:
        """What was dropped from a prompt of ``ids`` (``</s>`` included) cut to ``max_length``: the words as
        written, from the first one that lost a token, and the dropped tokens' own text where it differs (a word
        cut inside, or text the normalizer rewrote)."""
        kept = max_length - 1  # tokens before </s>
        spans = [match.span() for match in _WORD.finditer(text)]

        def tokens(end: int) -> int:
            return len(self.encode(text[:end])) - 1

        # The first word whose end lies past the kept tokens (prefix token counts only grow with more words).
        low, high = 0, len(spans) - 1
        while low < high:
            middle = (low + high) // 2
            if tokens(spans[middle][1]) > kept:
                high = middle
            else:
                low = middle + 1
        start, first_end = spans[low]
        words = text[start : spans[-1][1]]
        token_text = self.decode(ids[kept:-1])
        notes = []
        if tokens(start) < kept:
            notes.append(f"{text[start:first_end]!r} was cut inside")
        if token_text != words:
            notes.append(f"the dropped tokens read {token_text!r}")
        return (
            f"prompt {row} has {len(ids)} tokens but max_length={max_length}: the end of it was dropped: {words!r}"
            + (f" ({'; '.join(notes)})" if notes else "")
            + f". Shorten the prompt: the model reads {kept} token{'s' if kept > 1 else ''} and </s>."
        )


def _demo_prompt_check(folder: Path, vocab: UnigramVocab) -> Callable[[Sequence[str]], None] | None:
    """The bundled demo model's check of its prompts' words; None for any other tokenizer folder."""
    from ..demo import DEMO_MODEL  # imported here: the text package does not depend on the demo otherwise

    if folder.resolve() != (DEMO_MODEL / "tokenizer").resolve():
        return None
    from ..demo.prompts import warn_unknown_words

    return functools.partial(warn_unknown_words, normalize=vocab.normalize)
