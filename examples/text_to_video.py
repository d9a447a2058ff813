"""Text-to-video with a CogVideoX checkpoint: python examples/text_to_video.py MODEL [PROMPT].

MODEL is a hub id (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b, THUDM/CogVideoX1.5-5B) or a local folder.
"""

import sys

import torch

from cogvideox import Pipeline, save_video
from cogvideox.request import default_fps

model = sys.argv[1]
prompt = sys.argv[2] if len(sys.argv) > 2 else "A steam train crosses a stone viaduct at dawn, mist in the valley."
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32

pipe = Pipeline.from_pretrained(model, dtype=dtype, device=device)
if device == "cuda":
    pipe.vae.enable_tiling()  # decode in tiles: the untiled 49x480x720 decode needs far more memory
out = pipe(prompt, use_dynamic_cfg=True, generator=torch.Generator().manual_seed(42), output_type="np")
print(save_video(out.frames[0], "text_to_video.mp4", fps=default_fps(pipe.transformer.config)))
