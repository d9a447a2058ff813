"""Video-to-video: python examples/video_to_video.py MODEL VIDEO [PROMPT] [STRENGTH].

MODEL is a text-to-video checkpoint (THUDM/CogVideoX-5b, ...). STRENGTH in (0, 1]: how much of the schedule runs,
so how far the result may move from the input (default 0.7).
"""

import sys

USAGE = (
    "usage: python examples/video_to_video.py MODEL VIDEO [PROMPT] [STRENGTH]  (MODEL: e.g. THUDM/CogVideoX-5b; "
    "STRENGTH: a number in (0, 1], default 0.7)"
)


def _strength(argv: list[str]) -> float | None:
    """STRENGTH, 0.7 when not given, None when it is not a number."""
    try:
        return float(argv[3]) if len(argv) > 3 else 0.7
    except ValueError:
        return None


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    strength = _strength(argv)
    if not 2 <= len(argv) <= 4 or strength is None:
        print(USAGE, file=sys.stderr)
        return 2
    # Imported after the argument check: a usage error should not wait for torch.
    import torch

    from cogvideox import Pipeline, load_video, save_video
    from cogvideox.request import default_fps

    model, video_path = argv[0], argv[1]
    prompt = argv[2] if len(argv) > 2 else "The same scene in heavy snow."
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    pipe = Pipeline.from_pretrained(model, dtype=dtype, device=device)
    if device == "cuda":
        pipe.vae.enable_tiling()  # decode in tiles: the untiled 49x480x720 decode needs far more memory
    frames = load_video(video_path)[:49]  # the 1.0 models were trained on 49 frames
    out = pipe(prompt, video=frames, strength=strength, use_dynamic_cfg=True,
               generator=torch.Generator().manual_seed(42), output_type="np")  # fmt: skip
    print(save_video(out.frames[0], "video_to_video.mp4", fps=default_fps(pipe.transformer.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
