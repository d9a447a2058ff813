"""Parity of cogvideox.T5Tokenizer / cogvideox.T5Encoder with transformers' T5Tokenizer / T5EncoderModel.

The tokenizer reference is built from a sentencepiece model trained here (tiny vocabulary, a second to train),
in the layouts a checkpoint can come in: the published ``spiece.model`` + ``tokenizer_config.json`` folder, what
``transformers.T5Tokenizer.save_pretrained`` writes (``tokenizer.json``), and a pipeline root holding ``tokenizer/``.
The encoder reference is a tiny random ``T5EncoderModel`` saved with ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from cogvideox import T5Encoder, T5Tokenizer
from cogvideox.loading import build_on_meta
from tests.helpers import randomize_, rel_err, train_t5_spiece

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a spiece.model")

CORPUS = [
    "A steam train crosses a stone viaduct at dawn, mist rising from the valley below.",
    "The café on the corner serves crème brûlée, naïve jalapeño piñatas and smørrebrød.",
    "Un perro corre por la playa; el sol se pone detrás de las montañas.",
    "A panda, dressed in a small red jacket and a tiny hat, sits on a wooden stool in a serene bamboo forest.",
    "Numbers 12345 and symbols !@#$%^&*() are part of the text, too: 3.14, 1/2, 50% off!",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "\"Quoted,\" she said -- 'single quotes' and (parentheses) [brackets] {braces}.",
    "The camera slowly pans across a neon-lit city street at night, rain reflecting the lights.",
]
EXTRA_IDS = 7  # fewer sentinels than T5's 100 keeps the vocabulary small; the rule is the same

# Every whitespace character of the Unicode White_Space property, and look-alikes that are not whitespace.
WHITESPACE_PROBES = [
    f"x{ch}y"
    for ch in "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000\x1c\x1f\u180e\u200b\ufeff"
]
PROMPTS = [
    "",
    " ",
    "A steam train crosses a stone viaduct at dawn.",
    "Hello,   world!!  Multiple   spaces...",
    "  leading and trailing  ",
    "tabs\tand\nnewlines\r\nand\t\tmore\n",
    "crème brûlée, naïve café, Ångström, e\u0301 (combining accent), ſ, ﬁ, ½, Ⅻ",
    "emoji 🚂🌄 👩‍👩‍👧 🇫🇷 👍🏽 done",
    "ＦＵＬＬ　ｗｉｄｔｈ ＡＢＣ１２３",
    "नमस्ते 한국어 中文 русский",
    "special </s> in the middle</s>and<pad>glued <unk> too",
    "<extra_id_0> sentinels <extra_id_6> and <extra_id_60> <extra_id_",
    "look-alikes ＜pad＞ ＜/s＞ x＜extra_id_3＞y",
    "user defined <sep> piece<sep>glued",
    "a▁b ▁▁lead trail▁",
    "quotes \"double\" 'single' «guillemets» “curly” — dashes – …",
    "numbers 3.14159 1/2 50% $100 #hashtag @mention",
    *WHITESPACE_PROBES,
]
LONG_PROMPT = " ".join(CORPUS * 6)  # well over 226 tokens


@pytest.fixture(scope="session")
def tokenizer_folders(tmp_path_factory) -> dict[str, str]:
    """The layouts a tokenizer can be read from; the sentencepiece model has one user-defined piece."""
    root = tmp_path_factory.mktemp("tokenizers")
    published = train_t5_spiece(
        root / "published", CORPUS * 20, vocab_size=300, extra_ids=EXTRA_IDS, user_defined_symbols=("<sep>",)
    )
    saved = root / "saved"
    transformers.T5Tokenizer.from_pretrained(str(published)).save_pretrained(str(saved))
    assert (saved / "tokenizer.json").is_file()
    pipeline = root / "pipeline"
    shutil.copytree(published, pipeline / "tokenizer")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    return {"published": str(published), "saved": str(saved), "pipeline": str(pipeline)}


@pytest.mark.parametrize("layout", ["published", "saved", "pipeline"])
def test_tokenizer_ids_equal_reference(tokenizer_folders, layout):
    folder = tokenizer_folders[layout]
    ref_folder = folder + "/tokenizer" if layout == "pipeline" else folder
    ref = transformers.T5Tokenizer.from_pretrained(ref_folder)
    ours = T5Tokenizer.from_pretrained(folder)
    assert ours.vocab_size == len(ref)
    for prompt in [*PROMPTS, LONG_PROMPT]:
        assert ours.encode(prompt) == ref(prompt)["input_ids"], prompt


@pytest.mark.parametrize("max_length", [226, 12])
def test_tokenizer_batch_padding_and_truncation_equal_reference(tokenizer_folders, max_length):
    """The pipeline's call: padding="max_length", truncation, </s> appended; ids and mask as tensors."""
    ref = transformers.T5Tokenizer.from_pretrained(tokenizer_folders["published"])
    ours = T5Tokenizer.from_pretrained(tokenizer_folders["published"])
    batch = [*PROMPTS, LONG_PROMPT]
    expected = ref(
        batch,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    got = ours(batch, max_length=max_length)
    assert got.input_ids.dtype == torch.long and got.attention_mask.dtype == torch.long
    assert got.input_ids.shape == (len(batch), max_length)
    assert torch.equal(got.input_ids, expected.input_ids)
    assert torch.equal(got.attention_mask, expected.attention_mask)


def test_truncation_warning_quotes_the_dropped_text_as_the_pipeline_does(tokenizer_folders, caplog):
    ref = transformers.T5Tokenizer.from_pretrained(tokenizer_folders["published"])
    ours = T5Tokenizer.from_pretrained(tokenizer_folders["published"])
    max_length = 226
    untruncated = ref([LONG_PROMPT], padding="longest", return_tensors="pt").input_ids
    # The slice the diffusers CogVideoX pipeline decodes for its warning (_get_t5_prompt_embeds).
    removed = ref.batch_decode(untruncated[:, max_length - 1 : -1])[0]
    with caplog.at_level(logging.WARNING, logger="cogvideox.text.tokenizer"):
        ours([LONG_PROMPT], max_length=max_length)
    # Only our logger: transformers warns once per process about the long input above, in whichever test is first.
    ours_records = [r for r in caplog.records if r.name == "cogvideox.text.tokenizer"]
    assert len(ours_records) == 1
    assert repr(removed) in ours_records[0].getMessage()


# ----------------------------------------------------------------------------------------------- encoder

TINY = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_heads=4, dropout_rate=0.0)
ENCODER_CASES = {
    # max_distance 12 < sequence length 40: the logarithmic buckets saturate.
    "v1.1-short-distance": dict(
        TINY,
        num_layers=3,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
    ),
    # The published bucket settings (32 buckets, max distance 128) at the published length, 226.
    "v1.1-published-buckets": dict(
        TINY,
        num_layers=2,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    ),
    "original-t5-relu": dict(TINY, num_layers=2, feed_forward_proj="relu"),
}
LENGTHS = {"v1.1-short-distance": 40, "v1.1-published-buckets": 226, "original-t5-relu": 33}


def _save_reference(folder, case: str, max_shard_size: str | None = None):
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(**ENCODER_CASES[case])).eval()
    randomize_(model, seed=1, std=0.2)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(folder), **kwargs)
    return model


def _inputs(case: str, batch: int = 2):
    length = LENGTHS[case]
    ids = torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0  # a padded prompt
    return ids, mask


@pytest.mark.parametrize("case", list(ENCODER_CASES))
def test_encoder_equals_reference_float32(tmp_path, case):
    ref = _save_reference(tmp_path, case)
    ours = T5Encoder.from_pretrained(tmp_path)
    ids, mask = _inputs(case)
    with torch.no_grad():
        no_mask = rel_err(ours(ids), ref(ids).last_hidden_state)
        masked = rel_err(ours(ids, attention_mask=mask), ref(ids, attention_mask=mask).last_hidden_state)
    assert no_mask < 1e-5, no_mask
    assert masked < 1e-5, masked


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encoder_half_precision_matches_reference_bit_for_bit(tmp_path, dtype):
    """Same op order as the reference (RMS statistic in float32, wo in float32 under float16 only, float16 clamp),
    so on the same machine the outputs are identical, not merely close."""
    case = "v1.1-short-distance"
    _save_reference(tmp_path, case)
    ref = transformers.T5EncoderModel.from_pretrained(str(tmp_path), dtype=dtype).eval()
    ours = T5Encoder.from_pretrained(tmp_path, dtype=dtype)
    ref_dtypes = {n: p.dtype for n, p in ref.named_parameters() if n != "encoder.embed_tokens.weight"}
    assert {n: p.dtype for n, p in ours.named_parameters()} == ref_dtypes
    ids, mask = _inputs(case)
    with torch.no_grad():
        assert torch.equal(ours(ids), ref(ids).last_hidden_state)
        assert torch.equal(ours(ids, attention_mask=mask), ref(ids, attention_mask=mask).last_hidden_state)


def test_encoder_float16_overflow_is_clamped_as_in_reference(tmp_path):
    """Residual sums beyond the float16 range: both clamp the hidden states instead of carrying inf."""
    case = "v1.1-short-distance"
    model = _save_reference(tmp_path, case)
    fp16_max = torch.finfo(torch.float16).max
    with torch.no_grad():
        # Embeddings at the float16 maximum plus an attention output of the same sign overflow to inf.
        model.shared.weight.copy_(fp16_max * torch.sign(model.shared.weight))
        model.encoder.block[0].layer[0].SelfAttention.o.weight.mul_(100)
    model.save_pretrained(str(tmp_path))
    ref = transformers.T5EncoderModel.from_pretrained(str(tmp_path), dtype=torch.float16).eval()
    ours = T5Encoder.from_pretrained(tmp_path, dtype=torch.float16)
    ids, _ = _inputs(case)
    with torch.no_grad():
        hidden = ours.encoder.block[0].layer[0](ours.shared(ids), ours.position_bias(ids.shape[1]))
        assert torch.isinf(hidden).any(), "the test needs an overflowing attention sub-layer"
        out, expected = ours(ids), ref(ids).last_hidden_state
    assert torch.isfinite(out).all()
    assert torch.equal(out, expected)


def test_encoder_float16_file_keeps_wo_in_float32_like_reference(tmp_path):
    case = "original-t5-relu"
    _save_reference(tmp_path, case).half().save_pretrained(str(tmp_path))
    ref = transformers.T5EncoderModel.from_pretrained(str(tmp_path)).eval()
    ours = T5Encoder.from_pretrained(tmp_path)
    ref_dtypes = {n: p.dtype for n, p in ref.named_parameters() if n != "encoder.embed_tokens.weight"}
    assert {n: p.dtype for n, p in ours.named_parameters()} == ref_dtypes
    assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


def _rewrite_embedding(folder, keys: list[str], extra: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    embedding = state.pop("shared.weight", None)
    if embedding is None:
        embedding = state.pop("encoder.embed_tokens.weight")
    for key in keys:
        state[key] = embedding.clone()
    state.update(extra or {})
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "stored",
    [["shared.weight"], ["encoder.embed_tokens.weight"], ["shared.weight", "encoder.embed_tokens.weight"]],
)
def test_encoder_reads_the_embedding_under_either_key(tmp_path, stored):
    case = "original-t5-relu"
    ref = _save_reference(tmp_path, case)
    decoder_leftover = {"decoder.final_layer_norm.weight": torch.ones(TINY["d_model"])}
    _rewrite_embedding(tmp_path, stored, extra=decoder_leftover)
    ours = T5Encoder.from_pretrained(tmp_path)
    ids, _ = _inputs(case)
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).last_hidden_state) < 1e-5


def test_encoder_loads_sharded_checkpoint_from_pipeline_root(tmp_path):
    case = "v1.1-short-distance"
    ref = _save_reference(tmp_path / "text_encoder", case, max_shard_size="40KB")
    assert (tmp_path / "text_encoder" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "text_encoder").glob("model-*-of-*.safetensors"))) > 1
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    ours = T5Encoder.from_pretrained(tmp_path)
    ids, _ = _inputs(case)
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).last_hidden_state) < 1e-5


def test_t5_xxl_on_meta_has_the_reference_keys_and_shapes():
    from cogvideox.configs import T5Config
    from cogvideox.presets import T5_XXL as T5_V1_1_XXL  # the published text_encoder/config.json

    with torch.device("meta"):
        ref = transformers.T5EncoderModel(transformers.T5Config(**T5_V1_1_XXL))
    ours = build_on_meta(lambda: T5Encoder(T5Config(**T5_V1_1_XXL)))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    # The reference also lists the tied alias encoder.embed_tokens.weight (the same tensor as shared.weight).
    assert expected.pop("encoder.embed_tokens.weight") == expected["shared.weight"]
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert sum(p.numel() for p in ours.parameters()) == 4_762_310_656


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 12), (16, 20), (4, 5), (64, 300)])
def test_relative_position_buckets_equal_reference(num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    from cogvideox.text import relative_position_buckets

    length = 400
    position = torch.arange(length)
    expected = T5Attention._relative_position_bucket(
        position[None, :] - position[:, None], bidirectional=True, num_buckets=num_buckets, max_distance=max_distance
    )
    got = relative_position_buckets(length, num_buckets, max_distance)
    assert torch.equal(got, expected)
