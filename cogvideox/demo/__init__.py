"""The demo model that ships inside the package: a tiny CogVideoX trained here on synthetic clips.

``Pipeline.from_pretrained()`` and ``cogvideox generate`` without ``--model`` load it, so the first command runs
on any CPU, offline, in seconds. It draws one coloured circle or square moving across a black 32x32 square for
9 frames, from captions such as "a red circle moves to the right" (:mod:`cogvideox.demo.data` lists the words).

- :mod:`cogvideox.demo.data`: the synthetic clips and captions, with held-out colour-direction pairs;
- :mod:`cogvideox.demo.tokenizer`: its sentencepiece file, one piece per caption word, case and punctuation folded;
- :mod:`cogvideox.demo.prompts`: its vocabulary, and the warning about prompts with other words;
- :mod:`cogvideox.demo.train`: ``python -m cogvideox.demo.train`` retrains it (about 20 minutes on two cores);
- :mod:`cogvideox.demo.evaluate`: the dominant colour and motion direction of a generated video.
"""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parent / "model"


def demo_model_path() -> Path:
    """The bundled demo pipeline folder (published layout); a clear error when it is missing."""
    if not (DEMO_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the demo model is missing from {DEMO_MODEL} (a source checkout without it?): retrain it with "
            "`python -m cogvideox.demo.train`, or pass a model folder or hub id"
        )
    return DEMO_MODEL
