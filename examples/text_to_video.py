"""Text-to-video with a CogVideoX checkpoint: python examples/text_to_video.py MODEL [PROMPT].

MODEL is a hub id (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b, THUDM/CogVideoX1.5-5B) or a local folder.
"""

import sys

USAGE = (
    "usage: python examples/text_to_video.py MODEL [PROMPT]  (MODEL: a hub id such as THUDM/CogVideoX-2b, or a folder)"
)


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not 1 <= len(argv) <= 2:
        print(USAGE, file=sys.stderr)
        return 2
    # Imported after the argument check: a usage error should not wait for torch.
    import torch

    from cogvideox import Pipeline, save_video
    from cogvideox.request import default_fps

    model = argv[0]
    prompt = argv[1] if len(argv) > 1 else "A steam train crosses a stone viaduct at dawn, mist in the valley."
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    pipe = Pipeline.from_pretrained(model, dtype=dtype, device=device)
    if device == "cuda":
        pipe.vae.enable_tiling()  # decode in tiles: the untiled 49x480x720 decode needs far more memory
    out = pipe(prompt, use_dynamic_cfg=True, generator=torch.Generator().manual_seed(42), output_type="np")
    print(save_video(out.frames[0], "text_to_video.mp4", fps=default_fps(pipe.transformer.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
