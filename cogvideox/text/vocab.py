"""Reading a T5 tokenizer folder into a Unigram vocabulary and a normalizer.

Two file layouts are read, in the order the reference (transformers 5.x ``T5Tokenizer.from_pretrained``) prefers:

- ``tokenizer.json`` (what ``transformers.T5Tokenizer.save_pretrained`` writes since 5.0): the Unigram pieces and
  scores, the ``Precompiled`` character map of the normalizer and the added tokens;
- ``spiece.model`` (the published CogVideoX ``tokenizer/`` folders): a sentencepiece ``ModelProto``. Its pieces,
  scores and types are read with the small protobuf reader below (protobuf is not a dependency).

In both cases the text normalization (NFKC-like character map) is run by ``sentencepiece`` itself, with its
whitespace handling switched off: the reference splits on whitespace *after* this normalization (see tokenizer.py).

``tokenizer_config.json`` gives ``extra_ids`` (100 by default, as in the reference), the sentinel tokens
``<extra_id_0>`` .. ``<extra_id_{n-1}>`` that follow the sentencepiece pieces in reverse order, and
``model_max_length``.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..configs import read_json

logger = logging.getLogger(__name__)

SPIECE_FILE = "spiece.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# sentencepiece ModelProto.SentencePiece.Type values (sentencepiece_model.proto).
_PIECE_CONTROL, _PIECE_USER_DEFINED = 3, 4
_MODEL_TYPE_UNIGRAM = 1

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
# The reference's T5Tokenizer builds its Unigram model with unk id 2 whatever the file says (T5's layout:
# <pad>=0, </s>=1, <unk>=2).
T5_UNK_ID = 2


@dataclasses.dataclass(frozen=True)
class UnigramVocab:
    """Everything the T5 tokenizer needs from the files.

    Attributes:
        pieces: the token strings; the index is the id (sentencepiece pieces, then the sentinels in reverse order).
        scores: log-probabilities of the pieces (sentinels and control pieces score 0.0, as in the reference).
        unk_id: id given to text that no piece covers.
        added_tokens: strings cut out of the raw text before anything else and given their own id
            (``</s>``, ``<pad>``, ``<unk>``, ``<extra_id_N>``, user-defined sentencepiece pieces).
        normalize: the character normalization applied to the text between added tokens.
        model_max_length: ``tokenizer_config.json``'s value, or None.
        source: the file the pieces came from, for messages.
    """

    pieces: tuple[str, ...]
    scores: tuple[float, ...]
    unk_id: int
    added_tokens: dict[str, int]
    normalize: Callable[[str], str]
    model_max_length: int | None
    source: str


# ----------------------------------------------------------------------------------------------- protobuf reading


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(field_number, wire_type, value)`` of one protobuf message (bytes for length-delimited fields)."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


# NormalizerSpec fields 3, 4, 5 (add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces) set to false.
# Protobuf keeps the last value of a repeated scalar field, so appending these overrides whatever a file says.
_WHITESPACE_HANDLING_OFF = b"\x18\x00\x20\x00\x28\x00"


@dataclasses.dataclass(frozen=True)
class SentencePieceModel:
    pieces: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int
    model_type: int
    charsmap: bytes


def parse_sentencepiece(data: bytes) -> SentencePieceModel:
    """The parts of a sentencepiece ``ModelProto`` the tokenizer uses (field numbers from sentencepiece_model.proto)."""
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    unk_id, model_type, charsmap = 0, _MODEL_TYPE_UNIGRAM, b""  # the proto's defaults
    for number, wire, value in _fields(data):
        if number == 1 and wire == 2:  # repeated SentencePiece pieces
            piece, score, kind = "", 0.0, 1
            for sub_number, sub_wire, sub_value in _fields(value):
                if sub_number == 1 and sub_wire == 2:
                    piece = sub_value.decode("utf-8")
                elif sub_number == 2 and sub_wire == 5:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub_number == 3 and sub_wire == 0:
                    kind = sub_value
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        elif number == 2 and wire == 2:  # TrainerSpec
            for sub_number, sub_wire, sub_value in _fields(value):
                if sub_number == 3 and sub_wire == 0:
                    model_type = sub_value
                elif sub_number == 40 and sub_wire == 0:
                    unk_id = sub_value
        elif number == 3 and wire == 2:  # NormalizerSpec: keep its precompiled_charsmap (field 2)
            for sub_number, sub_wire, sub_value in _fields(value):
                if sub_number == 2 and sub_wire == 2:
                    charsmap = sub_value
    return SentencePieceModel(pieces, scores, types, unk_id, model_type, charsmap)


# ----------------------------------------------------------------------------------------------- normalizer


def _sentencepiece_normalizer(charsmap: bytes) -> Callable[[str], str]:
    """sentencepiece's character-map normalization alone (no dummy prefix, no whitespace collapsing or escaping).

    The spec holds only the map (NormalizerSpec field 2), as the reference keeps only the map of either file.
    """
    import sentencepiece

    spec = b"\x12" + encode_varint(len(charsmap)) + charsmap + _WHITESPACE_HANDLING_OFF
    return sentencepiece.SentencePieceNormalizer(normalizer_spec=spec).normalize


def _precompiled_charsmap(normalizer: dict[str, Any] | None) -> bytes | None:
    """The ``Precompiled`` normalizer's character map in a tokenizer.json, looked for as the reference does
    (directly, or inside a ``Sequence``); any other normalizer is not used by the reference's T5Tokenizer."""
    if not normalizer:
        return None
    candidates = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for item in candidates:
        if item.get("type") == "Precompiled" and item.get("precompiled_charsmap"):
            return base64.b64decode(item["precompiled_charsmap"])
    return None


def _identity(text: str) -> str:
    return text


# ----------------------------------------------------------------------------------------------- folder reading


def _sentinels(extra_ids: int, first_id: int) -> dict[str, int]:
    """``<extra_id_0>`` is the *last* id: the sentinels follow the pieces in reverse order (reference T5Converter)."""
    return {f"<extra_id_{i}>": first_id + extra_ids - 1 - i for i in range(extra_ids)}


def _from_sentencepiece(path: Path, extra_ids: int) -> tuple[list[str], list[float], int, dict[str, int], bytes | None]:
    try:
        model = parse_sentencepiece(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a sentencepiece model file: {err}") from err
    if not model.pieces:
        raise ValueError(f"{path} holds no sentencepiece pieces: is it a sentencepiece model file?")
    if model.model_type != _MODEL_TYPE_UNIGRAM:
        raise ValueError(
            f"{path} is a sentencepiece model of type {model.model_type}; T5 uses a Unigram model (type 1)"
        )
    added = {
        piece: i
        for i, (piece, kind) in enumerate(zip(model.pieces, model.types, strict=True))
        if kind in (_PIECE_CONTROL, _PIECE_USER_DEFINED)  # the reference makes these added tokens
    }
    sentinels = _sentinels(extra_ids, len(model.pieces))
    pieces = model.pieces + sorted(sentinels, key=sentinels.__getitem__)
    scores = model.scores + [0.0] * extra_ids
    return pieces, scores, model.unk_id, {**added, **sentinels}, model.charsmap or None


def _from_tokenizer_json(path: Path) -> tuple[list[str], list[float], int, dict[str, int], bytes | None]:
    data = read_json(path, what="a T5 tokenizer.json (a Unigram model saved by transformers)")
    model = data.get("model") or {}
    if model.get("type") != "Unigram":
        raise ValueError(f"{path}: the T5 tokenizer needs a Unigram model, this file has {model.get('type')!r}")
    vocab = model.get("vocab") or []
    pieces = [str(entry[0]) for entry in vocab]
    scores = [float(entry[1]) for entry in vocab]
    index = {piece: i for i, piece in enumerate(pieces)}
    added: dict[str, int] = {}
    for token in data.get("added_tokens") or []:
        content, token_id = token.get("content"), token.get("id")
        if index.get(content) != token_id:
            logger.warning(
                "%s: added token %r (id %s) is not the vocabulary's piece %s; ignored",
                path,
                content,
                token_id,
                index.get(content),
            )
            continue
        added[content] = token_id
    unk_id = model.get("unk_id")
    return (
        pieces,
        scores,
        T5_UNK_ID if unk_id is None else int(unk_id),
        added,
        _precompiled_charsmap(data.get("normalizer")),
    )


def load_vocab(folder: str | Path) -> UnigramVocab:
    """Read the tokenizer files of ``folder`` (see the module docstring).

    Raises:
        FileNotFoundError: neither ``tokenizer.json`` nor ``spiece.model`` is in the folder.
        ValueError: a file is not what its name says.
    """
    folder = Path(folder)
    config_path = folder / TOKENIZER_CONFIG
    what = "the tokenizer_config.json of a T5 tokenizer folder"
    config = read_json(config_path, what=what) if config_path.is_file() else {}
    extra_ids = config.get("extra_ids", 100)
    if isinstance(extra_ids, bool) or not isinstance(extra_ids, int) or extra_ids < 0:
        raise ValueError(f"{config_path}: extra_ids={extra_ids!r} must be a non-negative integer")

    json_path, spiece_path = folder / TOKENIZER_JSON, folder / SPIECE_FILE
    if json_path.is_file():
        pieces, scores, file_unk_id, added, charsmap = _from_tokenizer_json(json_path)
        source = json_path
    elif spiece_path.is_file():
        pieces, scores, file_unk_id, added, charsmap = _from_sentencepiece(spiece_path, extra_ids)
        source = spiece_path
    else:
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "the folder does not exist"
        raise FileNotFoundError(
            f"{folder} has no {SPIECE_FILE} (nor a {TOKENIZER_JSON}): a T5 tokenizer folder holds the sentencepiece "
            f"model {SPIECE_FILE}. Found: {present}. Pass the pipeline's 'tokenizer' folder (or the pipeline root)."
        )

    if file_unk_id != T5_UNK_ID:
        logger.warning(
            "%s gives unk id %d; T5 uses %d, as the reference T5Tokenizer does whatever the file says",
            source,
            file_unk_id,
            T5_UNK_ID,
        )
    index = {piece: i for i, piece in enumerate(pieces)}
    # The reference makes these added tokens whatever the file lists (T5Tokenizer.__init__).
    wanted = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *_sentinels(extra_ids, 0)]
    listed = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    wanted += [str(t["content"] if isinstance(t, dict) else t) for t in listed]
    missing = []
    for token in wanted:
        if token in index:
            added.setdefault(token, index[token])
        elif token not in added:
            missing.append(token)
    if missing:
        logger.warning(
            "%s: %d special tokens are not in the vocabulary and are not recognised in text: %s%s",
            source,
            len(missing),
            missing[:5],
            " ..." if len(missing) > 5 else "",
        )
    for required in (PAD_TOKEN, EOS_TOKEN):
        if required not in added:
            raise ValueError(f"{source}: the vocabulary has no {required!r} piece, which T5 needs")

    max_length = config.get("model_max_length")
    return UnigramVocab(
        pieces=tuple(pieces),
        scores=tuple(scores),
        unk_id=T5_UNK_ID,
        added_tokens=added,
        normalize=_identity if charsmap is None else _sentencepiece_normalizer(charsmap),
        model_max_length=max_length if isinstance(max_length, int) and max_length < 10**9 else None,
        source=str(source),
    )
