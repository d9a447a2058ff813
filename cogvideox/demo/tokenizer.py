"""The demo model's tokenizer: a sentencepiece Unigram model whose pieces are the captions' whole words.

sentencepiece's Unigram trainer, given a few dozen captions, prunes its vocabulary down to single characters
(a caption then takes ~25 tokens), and our tokenizer only reads
Unigram models (the type every T5 ships). So the demo trains a Unigram model for its normaliser and characters,
then appends one piece per caption word ("▁red", "▁moves", ...) with a score that beats any spelling of the
word from smaller pieces. A caption becomes one token per word, plus ``</s>``.

Pieces are appended to the serialized ``ModelProto`` as extra entries of its repeated ``pieces`` field (field 1);
protobuf parsers concatenate repeated fields wherever they appear, so sentencepiece itself and
:class:`cogvideox.T5Tokenizer` both read the result, with the new pieces after the trained ones.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..atomic import atomic_path
from ..text.tokenizer import METASPACE
from ..text.vocab import encode_varint

WORD_SCORE = -2.0  # log-probability of each whole-word piece; characters score about -2 to -5 each


def _piece_message(piece: str, score: float) -> bytes:
    """One ``ModelProto.pieces`` entry: SentencePiece{piece: 1 (string), score: 2 (float)}; type defaults NORMAL."""
    text = piece.encode("utf-8")
    inner = b"\x0a" + encode_varint(len(text)) + text + b"\x15" + struct.pack("<f", score)
    return b"\x0a" + encode_varint(len(inner)) + inner


def train_tokenizer(folder: Path, corpus: Iterable[str], *, max_length: int) -> Path:
    """Write ``folder/spiece.model`` and ``tokenizer_config.json`` (T5 ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).

    Args:
        folder: the ``tokenizer/`` folder to write (created).
        corpus: the captions; every whitespace-separated word becomes one piece.
        max_length: the ``model_max_length`` written to the tokenizer config (the demo's text length).
    Returns:
        The path of ``spiece.model``.
    """
    import json

    import sentencepiece

    corpus = list(corpus)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        prefix = os.path.join(scratch, "spiece")
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_prefix=prefix,
            model_type="unigram",
            vocab_size=64,
            hard_vocab_limit=False,
            character_coverage=1.0,
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            minloglevel=2,
        )
        trained = Path(prefix + ".model").read_bytes()
        existing = sentencepiece.SentencePieceProcessor(model_file=prefix + ".model")
        known = {existing.id_to_piece(i) for i in range(existing.get_piece_size())}
    words = sorted({METASPACE + word for text in corpus for word in text.split()} - known)
    model = trained + b"".join(_piece_message(word, WORD_SCORE) for word in words)
    target = folder / "spiece.model"
    _write_atomic(target, model)
    config = {"model_max_length": max_length, "extra_ids": 0, "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", "tokenizer_class": "T5Tokenizer"}  # fmt: skip
    _write_atomic(folder / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
    return target


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
