"""Training and fine-tuning: the v-prediction objective, I2V conditioning, Frame Pack, trainable LoRA, a trainer.

See docs/training.md. Nothing here runs at import; ``torch.distributed`` is used only when initialised.
"""

from .conditioning import (
    drop_captions,
    drop_image_latents,
    encode_video,
    image_latents,
    noise_image,
    ofs_for,
    pad_to_temporal_patch,
)
from .framepack import PackedClips, pack_clips, pad_like
from .lora import TrainableLoraAdapter, inject_lora, lora_parameters, lora_state_dict, save_lora, trainable_adapters
from .objective import DiffusionObjective
from .trainer import (
    StepResult,
    Trainer,
    TrainingBatch,
    TrainingConfig,
    constant_with_warmup,
    distributed_ready,
    is_main_process,
    wrap_ddp,
)

__all__ = [
    "DiffusionObjective",
    "PackedClips",
    "StepResult",
    "TrainableLoraAdapter",
    "Trainer",
    "TrainingBatch",
    "TrainingConfig",
    "constant_with_warmup",
    "distributed_ready",
    "drop_captions",
    "drop_image_latents",
    "encode_video",
    "image_latents",
    "inject_lora",
    "is_main_process",
    "lora_parameters",
    "lora_state_dict",
    "noise_image",
    "ofs_for",
    "pack_clips",
    "pad_like",
    "pad_to_temporal_patch",
    "save_lora",
    "trainable_adapters",
    "wrap_ddp",
]
