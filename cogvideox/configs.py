"""Typed, frozen configurations whose fields are the keys of the published ``config.json`` files.

Every component reads its ``config.json`` through :func:`config_from_dict`, which
- keeps the published defaults for keys a file leaves out (older checkpoints omit newer keys),
- ignores metadata keys that start with ``_`` (``_class_name``, ``_diffusers_version``, ...),
- logs the unknown keys once, in one message, and never uses them.

Component-specific configs live here so that one file lists every knob the checkpoints can turn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

C = TypeVar("C")


def _freeze(value: Any) -> Any:
    """JSON lists become tuples so that frozen configs stay hashable (they key caches)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "<dict>") -> C:
    """Build the dataclass ``cls`` from a ``config.json`` mapping.

    Args:
        cls: a dataclass type whose field names are config keys.
        data: the parsed JSON object.
        source: where ``data`` came from, for messages.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a config must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in known and not k.startswith("_"))
    if unknown:
        logger.warning("%s: ignoring config keys %s that %s does not use", source, unknown, cls.__name__)
    kwargs = {k: _freeze(v) for k, v in data.items() if k in known}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: invalid {cls.__name__}: {err}") from err


def read_config(folder: str | Path, cls: type[C], filename: str = "config.json") -> C:
    """Read ``folder/filename`` into ``cls``; errors name the file and what is wrong with it."""
    path = Path(folder) / filename
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a model folder in the published layout has a {filename} next to its weights"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return config_from_dict(cls, data, source=str(path))


def config_to_dict(config: Any, class_name: str | None = None) -> dict[str, Any]:
    """The inverse of :func:`config_from_dict`: a JSON-ready mapping (tuples become lists)."""
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    if class_name is not None:
        data = {"_class_name": class_name, **data}
    return data


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """``transformer/config.json`` of every published CogVideoX model (keys as published; defaults are the
    reference's, which equal the 2B's). See reference/features.md section 3.2 for the per-model values."""

    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: int | None = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0
    attention_bias: bool = True
    sample_width: int = 90
    sample_height: int = 60
    # Published as pixel frames (49), not latent frames (13): the reference keeps this for compatibility.
    sample_frames: int = 49
    patch_size: int = 2
    patch_size_t: int | None = None
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True

    def __post_init__(self) -> None:
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            # The reference refuses this combination too: no checkpoint has learned positions without RoPE.
            raise ValueError(
                "use_learned_positional_embeddings=True needs use_rotary_positional_embeddings=True "
                "(the only published model with learned positions, CogVideoX-5B-I2V, uses both)"
            )
        if self.activation_fn != "gelu-approximate":
            raise ValueError(f"activation_fn={self.activation_fn!r}: only 'gelu-approximate' is supported")
        if self.timestep_activation_fn != "silu":
            raise ValueError(f"timestep_activation_fn={self.timestep_activation_fn!r}: only 'silu' is supported")
        if self.patch_size_t is not None and self.patch_size_t < 1:
            raise ValueError(f"patch_size_t={self.patch_size_t}: must be None or a positive integer")

    @property
    def inner_dim(self) -> int:
        """Width of the token stream: heads x head size (1920 for 2B, 3072 for 5B)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """``out_channels`` with the reference's fallback to ``in_channels`` when it is null."""
        return self.out_channels if self.out_channels is not None else self.in_channels


# Names the two reference scheduler classes accept; kept here (not in cogvideox.samplers) so that the config can
# validate itself without importing the samplers package.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """``scheduler/scheduler_config.json``: the keys both reference classes (``CogVideoXDDIMScheduler`` and
    ``CogVideoXDPMScheduler``) read, with ``CogVideoXDDIMScheduler``'s defaults (the class every published
    checkpoint names). The published files set every key; see reference/features.md section 3.4.

    ``clip_sample``, ``clip_sample_range`` and ``sample_max_value`` are kept so that files round-trip, but neither
    reference class uses them, so the samplers ignore them too.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    clip_sample_range: float = 1.0
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    # 3.0 for CogVideoX-2B, 1.0 (no shift) for the 5B models.
    snr_shift_scale: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int):
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r}: must be a positive integer")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps}: must be a positive integer")
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"beta_schedule={self.beta_schedule!r} is not supported: choose one of {list(BETA_SCHEDULES)} "
                "or give trained_betas"
            )
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(self.trained_betas)} values but num_train_timesteps="
                f"{self.num_train_timesteps}: give one beta per training timestep"
            )
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing={self.timestep_spacing!r} is not supported: choose one of {list(TIMESTEP_SPACINGS)}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={self.prediction_type!r} is not supported: choose one of {list(PREDICTION_TYPES)} "
                "(the published CogVideoX checkpoints use 'v_prediction')"
            )
        if not self.snr_shift_scale > 0:
            raise ValueError(f"snr_shift_scale={self.snr_shift_scale}: must be > 0 (1.0 means no shift)")
        if self.steps_offset < 0:
            raise ValueError(f"steps_offset={self.steps_offset}: must be >= 0")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """``vae/config.json`` (diffusers ``AutoencoderKLCogVideoX``; keys as published, defaults the reference's).

    All published models share the architecture; they differ in ``scaling_factor`` (2B 1.15258426; 5B, 5B-I2V and
    1.5 0.7) and ``invert_scale_latents`` (true for 1.5). See reference/features.md section 3.3.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple[str, ...] = ("CogVideoXUpBlock3D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    sample_height: int = 480
    sample_width: int = 720
    scaling_factor: float = 1.15258426
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False

    def __post_init__(self) -> None:
        levels = len(self.block_out_channels)
        if levels < 1 or any(c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={list(self.block_out_channels)}: needs one positive width per level")
        for name, types, allowed in (
            ("down_block_types", self.down_block_types, "CogVideoXDownBlock3D"),
            ("up_block_types", self.up_block_types, "CogVideoXUpBlock3D"),
        ):
            if len(types) != levels or any(t != allowed for t in types):
                raise ValueError(
                    f"{name}={list(types)}: must be {levels} x {allowed!r} (one per entry of block_out_channels)"
                )
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={self.act_fn!r}: only 'silu' (alias 'swish') is supported")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if self.norm_num_groups < 1 or bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups}: must divide every width in block_out_channels "
                f"{list(self.block_out_channels)}"
            )
        ratio = self.temporal_compression_ratio
        if ratio != int(ratio) or int(ratio) < 1 or (int(ratio) & (int(ratio) - 1)) or int(ratio) > 2 ** (levels - 1):
            raise ValueError(
                f"temporal_compression_ratio={ratio}: must be a power of two from 1 to {2 ** (levels - 1)} "
                f"(time is halved on at most the {levels - 1} downsampling levels)"
            )
        object.__setattr__(self, "temporal_compression_ratio", int(ratio))
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block}: must be >= 1")
        if self.use_quant_conv or self.use_post_quant_conv:
            # No published checkpoint has them, and the reference sizes them from out_channels, not the latents.
            raise ValueError("use_quant_conv/use_post_quant_conv=true: unsupported (no CogVideoX checkpoint has them)")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor={self.scaling_factor}: must be > 0")

    @property
    def spatial_compression_ratio(self) -> int:
        """Pixels per latent along height and width: 2 per downsampling level (8 for the published models)."""
        return 2 ** (len(self.block_out_channels) - 1)


# Keys of a transformers T5 config.json that do not change what the T5 encoder computes at inference (decoder,
# training, generation and bookkeeping keys, and the two keys the reference re-derives from feed_forward_proj).
# The encoder drops them before reading its config, so that only truly unknown keys are reported.
T5_UNUSED_CONFIG_KEYS = frozenset(
    """architectures bos_token_id classifier_dropout decoder_start_token_id dense_act_fn dropout_rate dtype
    eos_token_id gradient_checkpointing initializer_factor is_decoder is_encoder_decoder is_gated_act model_type
    n_positions num_decoder_layers output_past pad_token_id scale_decoder_outputs task_specific_params
    tie_word_embeddings torch_dtype transformers_version use_cache""".split()
)
T5_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """``text_encoder/config.json`` (transformers ``T5Config``): the keys the T5 encoder uses, with the reference's
    defaults (t5-small's). CogVideoX ships T5 v1.1 XXL: d_model 4096, d_ff 10240, d_kv 64, 64 heads, 24 layers,
    vocab 32128, ``feed_forward_proj="gated-gelu"`` (see reference/features.md section 3.5)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be a positive integer")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in T5_ACTIVATIONS:
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r}: must be 'ACT' or 'gated-ACT' with ACT one of "
                f"{list(T5_ACTIVATIONS)} (T5 v1.1 uses 'gated-gelu', the original T5 'relu')"
            )
        # Bidirectional buckets: half per direction, half of those exact; the rest are logarithmic up to
        # max_distance, which must therefore exceed the exact range (the reference divides by log(max/exact)).
        exact = self.relative_attention_num_buckets // 4
        if exact < 1:
            raise ValueError(
                f"relative_attention_num_buckets={self.relative_attention_num_buckets}: must be at least 4 (T5 uses 32)"
            )
        if self.relative_attention_max_distance <= exact:
            raise ValueError(
                f"relative_attention_max_distance={self.relative_attention_max_distance}: must exceed "
                f"relative_attention_num_buckets // 4 = {exact} (T5 uses 128)"
            )

    @property
    def is_gated_act(self) -> bool:
        """True for the gated feed-forward of T5 v1.1 (``wi_0``, ``wi_1``); False for ``wi`` (original T5)."""
        return self.feed_forward_proj.startswith("gated-")

    @property
    def dense_act_fn(self) -> str:
        """The activation; ``gated-gelu`` means the tanh GELU ("gelu_new"), a backwards-compatibility rule of the
        reference's T5Config."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        """Width of the attention projections: heads x d_kv (4096 for T5-XXL, equal to d_model there)."""
        return self.num_heads * self.d_kv
