"""Multi-GPU (or multi-process CPU) inference over ``torch.distributed``: Ulysses sequence parallel, guidance
parallel, both together, and a parallel tiled VAE decode. NCCL on GPUs, gloo on CPUs; no communication layer of
our own. Every function takes its process group; importing this package does nothing.

    torchrun --nproc-per-node 4 -m cogvideox generate --model THUDM/CogVideoX-5b --prompt "..." \\
        --ulysses-degree 2 --cfg-parallel

or, in a script started by torchrun::

    device, rank, world = init_from_env()
    pipe = Pipeline.from_pretrained(path, dtype=torch.bfloat16, device=device,
                                    parallel=ParallelConfig(ulysses_degree=2, cfg_degree=2))

See docs/distributed.md for the layout, the communication volume of each mode and the expected speed-ups.
"""

from .failure import PeerFailure, fail_together, tear_down
from .groups import DEFAULT_TIMEOUT, ParallelConfig, ParallelState, collective_device, global_rank, init_from_env
from .guidance import GuidanceSplit, broadcast_from_main, guidance_split, shared_generator
from .inference import ParallelInference
from .ulysses import UlyssesParallel, disable_sequence_parallel, enable_sequence_parallel
from .vae import decode_parallel

__all__ = [
    "DEFAULT_TIMEOUT",
    "GuidanceSplit",
    "ParallelConfig",
    "ParallelInference",
    "ParallelState",
    "PeerFailure",
    "UlyssesParallel",
    "broadcast_from_main",
    "collective_device",
    "decode_parallel",
    "disable_sequence_parallel",
    "enable_sequence_parallel",
    "fail_together",
    "global_rank",
    "guidance_split",
    "init_from_env",
    "shared_generator",
    "tear_down",
]
