"""Unit tests of cogvideox.text: file reading, pre-tokenization, padding, errors, encoder numerics and errors."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import shutil
import sys
import types

import pytest
import torch

from cogvideox import T5Encoder, T5Tokenizer
from cogvideox.configs import T5Config
from cogvideox.ops import use_attention_backend
from cogvideox.text.t5 import _clamp_float16, read_t5_config, relative_position_buckets
from cogvideox.text.tokenizer import split_words
from cogvideox.text.vocab import UnigramVocab, parse_sentencepiece
from tests.helpers import randomize_, rel_err, train_t5_spiece

sentencepiece = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory):
    """A tokenizer/ folder with a tiny T5-layout sentencepiece model (<pad>=0, </s>=1, <unk>=2) and 3 sentinels."""
    lines = ["a quick brown fox jumps over the lazy dog", "the dog sleeps; the fox runs away, quickly!"] * 30
    return train_t5_spiece(tmp_path_factory.mktemp("tokenizer"), lines, vocab_size=60, extra_ids=3)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_folder):
    return T5Tokenizer.from_pretrained(tokenizer_folder)


# ----------------------------------------------------------------------------------------------- tokenizer


def test_protobuf_reader_agrees_with_sentencepiece(tokenizer_folder):
    path = tokenizer_folder / "spiece.model"
    model = parse_sentencepiece(path.read_bytes())
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert model.pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert model.scores == [sp.get_score(i) for i in range(sp.get_piece_size())]
    assert [i for i, kind in enumerate(model.types) if kind == 3] == [
        i for i in range(len(model.pieces)) if sp.is_control(i)
    ]
    assert model.unk_id == sp.unk_id() == 2
    assert len(model.charsmap) > 0  # the nmt_nfkc map the model was trained with


def test_sentinels_follow_the_pieces_in_reverse_order(tokenizer):
    pieces = len(tokenizer.vocab.pieces) - 3
    assert tokenizer.vocab_size == pieces + 3
    assert [tokenizer.vocab.added_tokens[f"<extra_id_{i}>"] for i in range(3)] == [pieces + 2, pieces + 1, pieces]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer.model_max_length == 226


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a  b", ["▁a", "▁b"]),
        ("\ta\nb\u3000c\x85d\xa0", ["▁a", "▁b", "▁c", "▁d"]),
        ("a\x1cb", ["▁a\x1cb"]),  # not White_Space in Unicode, though Python's str.isspace says so
        ("a▁b", ["▁a", "▁b"]),
        ("▁▁a", ["▁", "▁a"]),
        ("a▁", ["▁a", "▁"]),
        ("   ", []),
    ],
)
def test_split_words(text, words):
    assert split_words(text) == words


def test_padding_mask_and_special_tokens(tokenizer):
    out = tokenizer(["", "the dog<pad></s>"], max_length=8)
    assert out.input_ids.shape == out.attention_mask.shape == (2, 8)
    assert out.input_ids[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert out.attention_mask[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    ids = tokenizer.encode("the dog<pad></s>")
    assert ids[-3:] == [0, 1, 1]  # "<pad>" and "</s>" written in the text keep their ids, then </s> is appended
    assert out.attention_mask[1].tolist() == [1] * len(ids) + [0] * (8 - len(ids))  # the written <pad> counts


def test_unknown_characters_fuse_into_one_unk(tokenizer):
    ids = tokenizer.encode("dog 🚂🌄")
    assert ids[-2:] == [tokenizer.unk_token_id, 1]
    assert ids.count(tokenizer.unk_token_id) == 1


def test_truncation_keeps_eos_and_warns_with_dropped_text(tokenizer, caplog):
    text = "the quick brown fox jumps over the lazy dog"
    full = tokenizer.encode(text)
    with caplog.at_level(logging.WARNING, logger="cogvideox.text.tokenizer"):
        out = tokenizer(text, max_length=4)
    assert out.input_ids[0].tolist() == full[:3] + [1]
    assert out.attention_mask[0].tolist() == [1, 1, 1, 1]
    assert "lazy dog" in caplog.text and f"has {len(full)} tokens but max_length=4" in caplog.text


def _word_tokenizer(normalize=str) -> T5Tokenizer:
    """A hand-made vocabulary: "the" and "dog" are whole-word pieces, every other word is spelled out in letters."""
    pieces = ("<pad>", "</s>", "<unk>", "\u2581", "\u2581the", "\u2581dog", *"abcdefghijklmnopqrstuvwxyz")
    scores = (0.0, 0.0, 0.0, -2.0, -1.0, -1.0, *[-3.0] * 26)
    vocab = UnigramVocab(pieces=pieces, scores=scores, unk_id=2, added_tokens={"<pad>": 0, "</s>": 1, "<unk>": 2},
                         normalize=normalize, model_max_length=None, source="test")  # fmt: skip
    return T5Tokenizer(vocab)


@pytest.mark.parametrize(
    ("max_length", "message"),
    [
        # "plays" is "▁ p l a y s": 2 of its tokens kept, so the word is quoted whole, its cut noted.
        (6, "prompt 0 has 15 tokens but max_length=6: the end of it was dropped: 'plays piano' ('plays' was cut "
            "inside; the dropped tokens read 'ays piano'). Shorten the prompt: the model reads 5 tokens and </s>."),
        # Only its "▁" kept: the dropped tokens spell the whole word.
        (4, "prompt 0 has 15 tokens but max_length=4: the end of it was dropped: 'plays piano' ('plays' was cut "
            "inside). Shorten the prompt: the model reads 3 tokens and </s>."),
        (3, "prompt 0 has 15 tokens but max_length=3: the end of it was dropped: 'plays piano'. Shorten the "
            "prompt: the model reads 2 tokens and </s>."),
        (2, "prompt 0 has 15 tokens but max_length=2: the end of it was dropped: 'dog plays piano'. Shorten the "
            "prompt: the model reads 1 token and </s>."),
    ],
)  # fmt: skip
def test_truncation_warning_names_whole_words(max_length, message, caplog):
    tokenizer = _word_tokenizer()
    with caplog.at_level(logging.WARNING, logger="cogvideox.text.tokenizer"):
        out = tokenizer("the dog plays piano", max_length=max_length)
    assert caplog.messages == [message]
    assert out.input_ids[0].tolist() == tokenizer.encode("the dog plays piano")[: max_length - 1] + [1]


def test_truncation_warning_quotes_the_words_as_written(caplog):
    """Text the normalizer rewrote is quoted as the prompt has it, with the dropped tokens' text beside it."""
    tokenizer = _word_tokenizer(normalize=str.lower)
    with caplog.at_level(logging.WARNING, logger="cogvideox.text.tokenizer"):
        tokenizer("The DOG\tPlays  PIANO\n", max_length=3)
    assert caplog.messages == [
        "prompt 0 has 15 tokens but max_length=3: the end of it was dropped: 'Plays  PIANO' (the dropped tokens "
        "read 'plays piano'). Shorten the prompt: the model reads 2 tokens and </s>."
    ]


def test_check_prompts_sees_every_call_before_tokenizing(tokenizer_folder):
    seen = []
    tokenizer = T5Tokenizer(T5Tokenizer.from_pretrained(tokenizer_folder).vocab, check_prompts=seen.append)
    tokenizer("a dog", max_length=4)
    tokenizer(["the fox", ""], max_length=4)
    assert seen == [["a dog"], ["the fox", ""]]
    assert T5Tokenizer.from_pretrained(tokenizer_folder).check_prompts is None  # only the bundled demo's has one


def test_decode_round_trips_plain_text(tokenizer):
    assert tokenizer.decode(tokenizer.encode("the lazy dog")[:-1]) == "the lazy dog"


def test_tokenizer_from_pipeline_root(tokenizer_folder, tmp_path):
    shutil.copytree(tokenizer_folder, tmp_path / "tokenizer")
    (tmp_path / "model_index.json").write_text("{}")
    assert T5Tokenizer.from_pretrained(tmp_path).encode("a dog") == T5Tokenizer.from_pretrained(
        tokenizer_folder
    ).encode("a dog")


def test_folder_without_spiece_model_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no spiece\.model .*Found: \['config\.json'\]"):
        T5Tokenizer.from_pretrained(tmp_path)


def test_file_that_is_not_a_sentencepiece_model_is_an_error(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="is not a sentencepiece model file"):
        T5Tokenizer.from_pretrained(tmp_path)


def test_bad_prompts_and_lengths_are_errors(tokenizer):
    with pytest.raises(TypeError, match=r"texts\[1\] is 3 \(int\); every prompt must be a str"):
        tokenizer(["a dog", 3])
    with pytest.raises(TypeError, match="texts must be a str or a non-empty list of str, got None"):
        tokenizer(None)
    with pytest.raises(TypeError, match=r"non-empty list of str, got \[\]"):
        tokenizer([])
    with pytest.raises(ValueError, match=r"max_length=1: must be an integer >= 2"):
        tokenizer("a dog", max_length=1)
    with pytest.raises(ValueError, match=r"token ids \[99999\] are outside the vocabulary"):
        tokenizer.decode([1, 99999])


# ----------------------------------------------------------------------------------------------- config


def test_config_validation():
    with pytest.raises(ValueError, match="feed_forward_proj='gated-gelu-x'"):
        T5Config(feed_forward_proj="gated-gelu-x")
    with pytest.raises(ValueError, match="relative_attention_num_buckets=2: must be at least 4"):
        T5Config(relative_attention_num_buckets=2)
    with pytest.raises(ValueError, match="relative_attention_max_distance=8: must exceed"):
        T5Config(relative_attention_num_buckets=32, relative_attention_max_distance=8)
    assert T5Config(feed_forward_proj="gated-gelu").dense_act_fn == "gelu_new"
    assert T5Config(feed_forward_proj="gated-silu").is_gated_act


def test_config_reports_only_unknown_keys(tmp_path, caplog):
    data = {"d_model": 8, "architectures": ["T5EncoderModel"], "torch_dtype": "bfloat16", "my_new_knob": 1}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        config = read_t5_config(tmp_path)
    assert config.d_model == 8
    assert "my_new_knob" in caplog.text and "architectures" not in caplog.text


# ----------------------------------------------------------------------------------------------- encoder

TINY = T5Config(
    vocab_size=40,
    d_model=16,
    d_kv=4,
    d_ff=24,
    num_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8,
    relative_attention_max_distance=10,
)


@pytest.fixture
def encoder():
    return randomize_(T5Encoder(TINY), seed=0, std=0.3).eval()


def test_relative_position_buckets_layout():
    buckets = relative_position_buckets(300, num_buckets=32, max_distance=128)
    assert buckets.shape == (300, 300) and buckets.dtype == torch.long
    offsets = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    assert torch.equal(buckets[offsets == 0], torch.zeros_like(buckets[offsets == 0]))
    assert torch.equal(buckets[0, 1:8], torch.arange(17, 24))  # keys after the query: the upper half, exact
    assert torch.equal(buckets[7, :7], torch.arange(7, 0, -1))  # keys before: the lower half, exact
    assert (buckets[offsets >= 128] == 31).all() and (buckets[offsets <= -128] == 15).all()
    assert buckets.max() == 31 and buckets.min() == 0


def test_encoder_shapes_and_mask(encoder):
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        out = encoder(ids)
        assert out.shape == (2, 9, 16) and out.dtype == torch.float32
        # Masking the padding changes the tokens that attended to it, and only through the mask.
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 5:] = 0
        masked = encoder(ids, attention_mask=mask)
    assert torch.equal(masked[0], out[0])
    assert not torch.allclose(masked[1, :5], out[1, :5])
    with torch.no_grad():
        alone = encoder(ids[1:, :5])
    assert rel_err(masked[1, :5], alone[0]) < 1e-6  # the masked prompt equals the unpadded one


def test_encoder_backends_agree(encoder, monkeypatch):
    # A stand-in FlashAttention package, so that "flash" can be selected here; T5 must never reach its kernel.
    flash = types.ModuleType("flash_attn")
    flash.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    flash.flash_attn_func = lambda *args, **kwargs: pytest.fail("T5 must not reach the flash kernel")
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        sdpa = encoder(ids)
        with use_attention_backend("math"):
            math_out = encoder(ids)
        with use_attention_backend("flash"):  # no bias support: T5 falls back to sdpa rather than fail
            flash_choice = encoder(ids)
    assert rel_err(math_out, sdpa) < 1e-5
    assert torch.equal(flash_choice, sdpa)


def test_float16_clamp_follows_the_reference_rule():
    top = torch.finfo(torch.float16).max
    with_inf = torch.tensor([float("inf"), -float("inf"), 1.0], dtype=torch.float16)
    # max - 1000 = 64504 rounds to 64512 in float16
    assert _clamp_float16(with_inf).tolist() == [64512.0, -64512.0, 1.0]
    finite = torch.tensor([top, -top], dtype=torch.float16)
    assert torch.equal(_clamp_float16(finite), finite)
    big = torch.tensor([1e30], dtype=torch.float32)
    assert torch.equal(_clamp_float16(big), big)  # only float16 is clamped


def test_keep_wo_in_float32(encoder):
    encoder.half().keep_wo_in_float32()
    kinds = {n: p.dtype for n, p in encoder.named_parameters()}
    assert all((d == torch.float32) == n.endswith(".wo.weight") for n, d in kinds.items())
    with torch.no_grad():
        assert encoder(torch.randint(0, 40, (1, 6))).dtype == torch.float16


def test_encoder_input_errors(encoder):
    with pytest.raises(ValueError, match=r"token id 40, outside the vocabulary \[0, 40\)"):
        encoder(torch.tensor([[1, 40]]))
    with pytest.raises(ValueError, match=r"token id -1, outside the vocabulary"):
        encoder(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[B, L\], got torch.float32"):
        encoder(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"attention_mask has shape \[1, 3\], input_ids \[1, 4\]"):
        encoder(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
