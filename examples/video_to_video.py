"""Video-to-video: python examples/video_to_video.py MODEL VIDEO [PROMPT] [STRENGTH].

MODEL is a text-to-video checkpoint (THUDM/CogVideoX-5b, ...). STRENGTH in (0, 1]: how much of the schedule runs,
so how far the result may move from the input (default 0.7).
"""

import sys

import torch

from cogvideox import Pipeline, load_video, save_video
from cogvideox.request import default_fps

model, video_path = sys.argv[1], sys.argv[2]
prompt = sys.argv[3] if len(sys.argv) > 3 else "The same scene in heavy snow."
strength = float(sys.argv[4]) if len(sys.argv) > 4 else 0.7
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32

pipe = Pipeline.from_pretrained(model, dtype=dtype, device=device)
if device == "cuda":
    pipe.vae.enable_tiling()  # decode in tiles: the untiled 49x480x720 decode needs far more memory
frames = load_video(video_path)[:49]  # the 1.0 models were trained on 49 frames
out = pipe(prompt, video=frames, strength=strength, use_dynamic_cfg=True, generator=torch.Generator().manual_seed(42),
           output_type="np")  # fmt: skip
print(save_video(out.frames[0], "video_to_video.mp4", fps=default_fps(pipe.transformer.config)))
