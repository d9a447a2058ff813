"""The demo model's tokenizer: a sentencepiece Unigram model whose pieces are the captions' whole words.

sentencepiece's Unigram trainer, given a few dozen captions, prunes its vocabulary down to single characters
(a caption then takes ~25 tokens), and our tokenizer only reads
Unigram models (the type every T5 ships). So the demo trains a Unigram model for its normaliser and characters,
then appends one piece per caption word ("▁red", "▁moves", ...) with a score that beats any spelling of the
word from smaller pieces. A caption becomes one token per word, plus ``</s>``.

Pieces are appended to the serialized ``ModelProto`` as extra entries of its repeated ``pieces`` field (field 1);
protobuf parsers concatenate repeated fields wherever they appear, so sentencepiece itself and
:class:`cogvideox.T5Tokenizer` both read the result, with the new pieces after the trained ones.

The normaliser reads prompts the way the captions are written: sentencepiece's ``nmt_nfkc_cf`` rules (NFKC and
Unicode case folding) with every punctuation mark read as a space, so "A RED square moves up." gives the ids
of "a red square moves up". The rules live in the model file's character map (``normalizer_spec``), which every
reader of ``spiece.model`` applies (sentencepiece, :class:`cogvideox.T5Tokenizer`, transformers), so no reader
needs a special case. The captions are lower case without punctuation, so the rules leave them, and the pieces
trained on them, exactly as the plain ``nmt_nfkc`` rules did.
"""

from __future__ import annotations

import os
import re
import string
import struct
import tempfile
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..text.tokenizer import METASPACE
from ..text.vocab import encode_varint, parse_sentencepiece

WORD_SCORE = -2.0  # log-probability of each whole-word piece; characters score about -2 to -5 each
BASE_RULES = "nmt_nfkc_cf"  # sentencepiece's builtin NFKC + case folding (+ its control-character and space rules)
# Read as a space (so that "red,circle" is still two words): ASCII punctuation and symbols, and every Unicode
# punctuation mark (curly quotes, guillemets, dashes), which pasted prompts often carry.
PUNCTUATION = "".join(
    sorted(set(string.punctuation) | {chr(c) for c in range(0x110000) if unicodedata.category(chr(c))[0] == "P"})
)
_PUNCTUATION_RUN = re.compile(f"[{re.escape(PUNCTUATION)}]+")


def decompile_charsmap(charsmap: bytes) -> dict[str, str]:
    """The rules of a sentencepiece ``precompiled_charsmap``: {text: replacement}.

    The map is a little-endian uint32 trie size, a darts-clone double-array trie over the UTF-8 bytes of the
    sources, then the NUL-terminated replacements that the trie's values point into. Recent sentencepiece releases
    have ``SentencePieceNormalizer.decompile`` (0.2.3 does, 0.2.0 does not); this reads the same rules with any.
    The trie is walked one byte level at a time, every node of a level at once (numpy), as ~1 M lookups one by
    one take seconds.
    """
    (size,) = struct.unpack_from("<I", charsmap)
    units = np.frombuffer(charsmap, "<u4", count=size // 4, offset=4).astype(np.int64)
    replacements = charsmap[4 + size :]
    offsets = (units >> 10) << ((units & (1 << 9)) >> 6)  # where a unit's children (or its leaf's value) sit
    labels = units & ((1 << 31) | 0xFF)  # the byte that leads to a unit; bit 31 marks value units, never matched
    byte_values = np.arange(1, 256)
    rules: dict[str, str] = {}
    nodes, prefixes = offsets[:1], [b""]
    while len(nodes):
        level_nodes, level_prefixes = [], []
        for first in range(0, len(nodes), 2048):  # 2048 x 255 candidates at a time bounds the memory
            children = nodes[first : first + 2048, None] ^ byte_values
            children = np.where(children < len(units), children, 0)  # unit 0 (the root) has no label
            rows, columns = np.nonzero(labels[children] == byte_values)
            found = children[rows, columns]
            below = found ^ offsets[found]
            keys = [prefixes[first + r] + bytes((c + 1,)) for r, c in zip(rows.tolist(), columns.tolist(), strict=True)]
            has_leaf = (units[found] >> 8 & 1).tolist()
            value_starts = (units[below] & ((1 << 31) - 1)).tolist()
            for key, leaf, start in zip(keys, has_leaf, value_starts, strict=True):
                if leaf:
                    rules[key.decode("utf-8")] = replacements[start : replacements.index(b"\0", start)].decode("utf-8")
            level_nodes.append(below)
            level_prefixes += keys
        nodes, prefixes = np.concatenate(level_nodes), level_prefixes
    return rules


def normalization_rules() -> dict[str, str]:
    """The demo's character map: ``nmt_nfkc_cf`` with every punctuation mark, written ("!", "“") or made by NFKC
    from another character ("！", "…" -> "..."), read as one space."""
    import sentencepiece

    spec = sentencepiece.SentencePieceNormalizer(rule_name=BASE_RULES).serialized_model_proto()
    rules = {
        key: _PUNCTUATION_RUN.sub(" ", value)
        for key, value in decompile_charsmap(parse_sentencepiece(spec).charsmap).items()
    }
    rules.update(dict.fromkeys(PUNCTUATION, " "))
    return {key: value for key, value in rules.items() if key != value}  # sentencepiece refuses identity rules


def _write_rules_tsv(path: Path, rules: dict[str, str]) -> None:
    """sentencepiece's ``normalization_rule_tsv`` format: source and replacement as hex code points."""

    def hex_points(text: str) -> str:
        return " ".join(f"{ord(ch):X}" for ch in text)

    path.write_text("".join(f"{hex_points(k)}\t{hex_points(v)}\n" for k, v in sorted(rules.items())), "utf-8")


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
        rules_tsv = Path(scratch) / "normalization.tsv"
        _write_rules_tsv(rules_tsv, normalization_rules())
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
            normalization_rule_tsv=str(rules_tsv),
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
