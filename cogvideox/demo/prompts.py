"""The words the demo model reads, and a warning about prompts with other words.

The demo model was trained on captions "a {colour} {shape} moves {direction}" only (:mod:`cogvideox.demo.data`).
Any other word is spelled out in single characters that the model never learned to read, so it draws something
unrelated to it, silently. The bundled demo's tokenizer (:class:`cogvideox.T5Tokenizer`, through its
``check_prompts``) calls :func:`warn_unknown_words` on every batch of prompts; the warning names the unknown words
and lists the vocabulary, once per process, so that a loop over many prompts does not repeat it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ..text.tokenizer import split_words
from . import data

logger = logging.getLogger(__name__)

_warned = False  # the warning is given once per process


def vocabulary() -> frozenset[str]:
    """Every word of the demo's captions (held-out ones included): the words it has a token for."""
    return frozenset(word for caption in data.captions() for word in caption.split())


def unknown_words(prompts: Sequence[str], normalize: Callable[[str], str]) -> list[str]:
    """The words of ``prompts`` outside :func:`vocabulary`, in order of first appearance, each once.

    ``normalize`` is the tokenizer's character map (case folding, punctuation to spaces), so that a word is
    unknown exactly when the tokenizer has no piece for it.
    """
    known = vocabulary()
    unknown: dict[str, None] = {}
    for prompt in prompts:
        for word in split_words(normalize(prompt)):
            word = word[1:]  # without the word-start marker "▁"
            if word and word not in known:
                unknown.setdefault(word)
    return list(unknown)


def describe_vocabulary() -> str:
    """The demo's vocabulary, in the words of its captions."""
    return (
        f'captions "a {{colour}} {{shape}} moves {{direction}}" with the colours {", ".join(data.COLOURS)}; '
        f"the shapes {', '.join(data.SHAPES)}; the directions {', '.join(data.DIRECTIONS)}"
    )


def warn_unknown_words(prompts: Sequence[str], normalize: Callable[[str], str]) -> None:
    """Log a warning naming the words of ``prompts`` the demo model does not know, once per process."""
    global _warned
    if _warned:
        return
    unknown = unknown_words(prompts, normalize)
    if not unknown:
        return
    _warned = True
    logger.warning(
        "the bundled demo model does not know the %s %s, so its video will not follow them. It reads only %s "
        '(e.g. "a red circle moves to the right"; case and punctuation do not matter). Use these words, or load '
        "a real CogVideoX model (--model THUDM/CogVideoX-2b, or Pipeline.from_pretrained(path_or_hub_id)). "
        "(This warning is given once per process.)",
        "word" if len(unknown) == 1 else "words",
        ", ".join(repr(word) for word in unknown),
        describe_vocabulary(),
    )
