"""Image-to-video: python examples/image_to_video.py MODEL IMAGE [PROMPT].

MODEL is THUDM/CogVideoX-5b-I2V or THUDM/CogVideoX1.5-5B-I2V (or a local folder). The 5B-I2V generates at
480x720 only; the 1.5 I2V takes its size from the image's aspect ratio.
"""

import sys

USAGE = "usage: python examples/image_to_video.py MODEL IMAGE [PROMPT]  (MODEL: e.g. THUDM/CogVideoX-5b-I2V)"


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if not 2 <= len(argv) <= 3:
        print(USAGE, file=sys.stderr)
        return 2
    # Imported after the argument check: a usage error should not wait for torch.
    import torch

    from cogvideox import Pipeline, load_image, save_video
    from cogvideox.request import default_fps

    model, image_path = argv[0], argv[1]
    prompt = argv[2] if len(argv) > 2 else "The scene comes to life, the camera slowly pushing in."
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32

    pipe = Pipeline.from_pretrained(model, dtype=dtype, device=device)
    if device == "cuda":
        pipe.vae.enable_tiling()  # decode in tiles: the untiled 49x480x720 decode needs far more memory
    out = pipe(prompt, image=load_image(image_path), use_dynamic_cfg=True,
               generator=torch.Generator().manual_seed(42), output_type="np")  # fmt: skip
    print(save_video(out.frames[0], "image_to_video.mp4", fps=default_fps(pipe.transformer.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
