"""The bundled demo model's prompts: case and punctuation folded by its tokenizer file, the ids it was trained on
kept, and a warning, once per process, about words outside its vocabulary (cogvideox.demo.prompts)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from cogvideox import T5Tokenizer
from cogvideox.demo import DEMO_MODEL, data, model_configs, prompts
from cogvideox.demo.tokenizer import PUNCTUATION, decompile_charsmap, normalization_rules, train_tokenizer
from cogvideox.text.vocab import parse_sentencepiece

sentencepiece = pytest.importorskip("sentencepiece")

# The id of every caption word in the spiece.model the demo transformer and text encoder were trained with (read
# from that file before its normalizer learned case folding): a new tokenizer file must give exactly these.
TRAINED_IDS = {"a": 32, "blue": 33, "circle": 34, "down": 24, "green": 35, "left": 36, "moves": 37, "red": 38,
               "right": 39, "square": 40, "the": 41, "to": 42, "up": 43, "white": 44, "yellow": 45}  # fmt: skip
EOS = 1
# Written the way people type: capitals, sentence punctuation, full-width forms, curly quotes, dashes, ellipses.
VARIANTS = {
    "a red square moves up": [
        "A RED square moves up.",
        "A Red-Square, moves UP!!",
        "Ａ ＲＥＤ\u3000square moves up…",
        "“a red square” — moves «up»",
        "(a) red; square: moves up?",
    ],
    "a white circle moves to the left": ["A white circle moves to the left...", "A WHITE CIRCLE MOVES TO THE LEFT"],
}
UNKNOWN_WARNING = (
    "the bundled demo model does not know the words 'cat', 'playing', 'piano', so its video will not follow them. "
    'It reads only captions "a {colour} {shape} moves {direction}" with the colours red, green, blue, yellow, '
    "white; the shapes circle, square; the directions to the right, to the left, up, down "
    '(e.g. "a red circle moves to the right"; case and punctuation do not matter). Use these words, or load a '
    "real CogVideoX model (--model THUDM/CogVideoX-2b, or Pipeline.from_pretrained(path_or_hub_id)). "
    "(This warning is given once per process.)"
)


@pytest.fixture(scope="module")
def demo_tokenizer() -> T5Tokenizer:
    return T5Tokenizer.from_pretrained(DEMO_MODEL)


@pytest.fixture
def fresh_process(monkeypatch):
    """As in a new process: the once-per-process demo warning not given yet (restored after the test)."""
    monkeypatch.setattr(prompts, "_warned", False)


def _records(caplog, logger: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == logger]


# ----------------------------------------------------------------------------------------------- the model file


def test_training_captions_keep_the_ids_the_demo_was_trained_on(demo_tokenizer):
    for caption in data.captions():
        assert demo_tokenizer.encode(caption) == [TRAINED_IDS[word] for word in caption.split()] + [EOS], caption


@pytest.mark.parametrize(("caption", "variant"), [(c, v) for c, vs in VARIANTS.items() for v in vs])
def test_case_and_punctuation_are_folded(demo_tokenizer, caption, variant):
    assert demo_tokenizer.encode(variant) == demo_tokenizer.encode(caption)
    assert demo_tokenizer(variant, max_length=12).input_ids.equal(demo_tokenizer(caption, max_length=12).input_ids)


def test_every_reader_of_the_file_folds_alike(demo_tokenizer):
    """The rules are in the file's character map: sentencepiece and transformers apply them as ours does."""
    processor = sentencepiece.SentencePieceProcessor(model_file=str(DEMO_MODEL / "tokenizer" / "spiece.model"))
    texts = [v for vs in VARIANTS.values() for v in vs] + ["a cat playing piano"]
    for text in texts:
        assert processor.encode(text) + [EOS] == demo_tokenizer.encode(text), text
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a spiece.model")
    reference = transformers.T5Tokenizer.from_pretrained(DEMO_MODEL / "tokenizer")
    for text in texts:
        assert reference(text)["input_ids"] == demo_tokenizer.encode(text), text


def test_retraining_rebuilds_the_bundled_tokenizer(tmp_path):
    """`python -m cogvideox.demo.train` writes the same pieces, scores and character map as the committed file
    (the file differs only in the temporary paths sentencepiece records)."""
    train_tokenizer(tmp_path, data.captions(), max_length=model_configs.TEXT_LENGTH)
    built = parse_sentencepiece((tmp_path / "spiece.model").read_bytes())
    bundled = parse_sentencepiece((DEMO_MODEL / "tokenizer" / "spiece.model").read_bytes())
    assert built == bundled
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == json.loads((DEMO_MODEL / "tokenizer" / "tokenizer_config.json").read_text())


def test_normalization_rules_fold_case_and_read_punctuation_as_spaces():
    rules = normalization_rules()
    assert (rules["A"], rules["Ｒ"], rules["É"], rules["ﬁ"]) == ("a", "r", "é", "fi")  # NFKC and case folding
    assert all(rules[mark] == " " for mark in PUNCTUATION)  # ASCII and Unicode punctuation as written
    assert (rules["！"], rules["…"], rules["⑴"]) == (" ", " ", " 1 ")  # punctuation NFKC makes of other characters
    assert all(key != value for key, value in rules.items())


@pytest.mark.parametrize("rule_name", ["nmt_nfkc_cf", "nmt_nfkc"])
def test_decompiled_charsmap_equals_sentencepieces_own(rule_name):
    normalizer = sentencepiece.SentencePieceNormalizer(rule_name=rule_name)
    if not hasattr(normalizer, "decompile"):
        pytest.skip("this sentencepiece has no SentencePieceNormalizer.decompile to compare with")
    charsmap = parse_sentencepiece(normalizer.serialized_model_proto()).charsmap
    assert decompile_charsmap(charsmap) == dict(normalizer.decompile())


# ----------------------------------------------------------------------------------------------- unknown words


def test_unknown_words_are_named_with_the_vocabulary_once_per_process(demo_tokenizer, fresh_process, caplog):
    with caplog.at_level(logging.WARNING, logger="cogvideox.demo.prompts"):
        demo_tokenizer("a cat playing piano", max_length=12)
        demo_tokenizer(["a dog jumps", "A CAT"], max_length=12)
    assert _records(caplog, "cogvideox.demo.prompts") == [UNKNOWN_WARNING]


def test_one_unknown_word_is_named_in_the_singular(demo_tokenizer, fresh_process, caplog):
    with caplog.at_level(logging.WARNING, logger="cogvideox.demo.prompts"):
        demo_tokenizer(["a red circle moves up", "A purple circle moves up."], max_length=12)
    (message,) = _records(caplog, "cogvideox.demo.prompts")
    assert message.startswith("the bundled demo model does not know the word 'purple', so its video")


def test_known_words_in_any_case_do_not_warn(demo_tokenizer, fresh_process, caplog):
    everything = [v for vs in VARIANTS.values() for v in vs] + data.captions() + [""]
    with caplog.at_level(logging.WARNING, logger="cogvideox.demo.prompts"):
        demo_tokenizer(everything, max_length=12)
    assert _records(caplog, "cogvideox.demo.prompts") == []
    assert prompts.unknown_words(everything, demo_tokenizer.vocab.normalize) == []


def test_only_the_bundled_demo_tokenizer_checks_words(tmp_path, fresh_process, caplog):
    shutil.copytree(DEMO_MODEL / "tokenizer", tmp_path / "tokenizer")
    copy = T5Tokenizer.from_pretrained(tmp_path / "tokenizer")
    assert copy.check_prompts is None
    with caplog.at_level(logging.WARNING, logger="cogvideox.demo.prompts"):
        copy("a cat", max_length=12)
    assert _records(caplog, "cogvideox.demo.prompts") == []
    assert T5Tokenizer.from_pretrained(DEMO_MODEL / "tokenizer").check_prompts is not None


def test_truncated_unknown_words_are_quoted_whole(demo_tokenizer, fresh_process, caplog):
    """The prompt of the issue: 20 tokens, 'playing' cut after 'playi'; the warning names whole words."""
    with caplog.at_level(logging.WARNING):
        demo_tokenizer("a cat playing piano", max_length=12)
    assert _records(caplog, "cogvideox.text.tokenizer") == [
        "prompt 0 has 20 tokens but max_length=12: the end of it was dropped: 'playing piano' ('playing' was cut "
        "inside; the dropped tokens read 'ng piano'). Shorten the prompt: the model reads 11 tokens and </s>."
    ]
    assert len(_records(caplog, "cogvideox.demo.prompts")) == 1
