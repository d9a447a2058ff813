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
