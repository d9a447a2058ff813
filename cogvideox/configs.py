"""Typed, frozen configurations whose fields are the keys of the published ``config.json`` files.

Every component reads its ``config.json`` through :func:`config_from_dict`, which
- keeps the published defaults for keys a file leaves out (older checkpoints omit newer keys),
- ignores metadata keys that start with ``_`` (``_class_name``, ``_diffusers_version``, ...),
- logs the unknown keys once, in one message, and never uses them,
- checks each known key's value against the field's type, so that ``"num_layers": "2"`` is refused here, naming
  the file and the key, and not deep inside model building.

Every JSON file of a checkpoint (configs, shard indexes, tokenizer configs, ``model_index.json``) is read by
:func:`read_json`, so that a missing, malformed or mistyped file always gets the same kind of message. It lives here,
the one module of the package that imports nothing else from it, so that samplers, text and loading can all use it.

Component-specific configs live here so that one file lists every knob the checkpoints can turn.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import typing
from pathlib import Path
from types import UnionType
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

C = TypeVar("C")

# Names of parsed values' types in JSON's words (a tuple is a list frozen by _freeze).
_JSON_KINDS = {
    dict: "object",
    list: "array",
    tuple: "array",
    str: "string",
    bool: "boolean",
    int: "number",
    float: "number",
}


def _json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type (``"2"`` is a string, ``[1]`` an array, None null)."""
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def parse_json(text: str, *, source: str, what: str) -> dict[str, Any]:
    """Parse ``text`` as one JSON object; ``source`` (a path) and ``what`` (what it should be) go in messages.

    Raises:
        ValueError: the text is not valid JSON (line and column given), or holds something other than an object.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{source} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): it should be {what}; "
            "fix the file or download it again"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{source} holds a JSON {_json_kind(data)}, not an object: it should be {what}, a JSON object {{...}}"
        )
    return data


def read_json(path: str | Path, *, what: str) -> dict[str, Any]:
    """The JSON object in the file ``path``.

    Args:
        path: the file.
        what: what the file should be, for messages, e.g. ``"the config.json of a model folder"``.

    Raises:
        FileNotFoundError: ``path`` is not a file; the message names it and what it should be.
        ValueError: the file is not UTF-8 JSON, or not a JSON object; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"{path} {state}: it should be {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}): it should be {what}; fix the file or download it again"
        ) from err
    return parse_json(text, source=str(path), what=what)


def _freeze(value: Any) -> Any:
    """JSON lists become tuples so that frozen configs stay hashable (they key caches)."""
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    # The annotations are strings (``from __future__ import annotations``); resolve them once per class. A class
    # whose annotations cannot be resolved (defined in a function, say) gets no type check, only its own.
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe_type(annotation: Any) -> str:
    """English for a field annotation: ``tuple[int, ...] | None`` -> 'a list of integers, or null'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (UnionType, typing.Union):
        parts = [_describe_type(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (", or null" if type(None) in args else "")
    if origin is tuple:
        item = _describe_type(args[0]) if args else "anything"
        return "a list of " + {"an integer": "integers", "a number": "numbers", "a string": "strings"}.get(item, item)
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


_MISMATCH = object()  # returned by _coerce when the value does not fit the annotation


def _coerce(value: Any, annotation: Any) -> Any:
    """``value`` as the annotated type, or ``_MISMATCH``.

    Integers are accepted for float fields (JSON writers drop the ``.0``) and kept as written; floats with an
    integral value are accepted for integer fields (the reference annotates some integer keys float, e.g. the VAE's
    ``temporal_compression_ratio``) and become ints. Booleans are never numbers, although Python says they are.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (UnionType, typing.Union):
        if value is None:
            return None if type(None) in args else _MISMATCH
        for arg in args:
            if arg is not type(None) and (coerced := _coerce(value, arg)) is not _MISMATCH:
                return coerced
        return _MISMATCH
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        item = args[0] if args else Any
        items = [v if item is Any else _coerce(v, item) for v in value]
        return _MISMATCH if any(v is _MISMATCH for v in items) else tuple(items)
    if annotation is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if annotation is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if annotation is float:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else _MISMATCH
    if annotation is str:
        return value if isinstance(value, str) else _MISMATCH
    return value  # an annotation this checker does not know: left to the dataclass


def _as_json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):  # a Python object given to config_from_dict directly
        return repr(value)


def _parsed_or_mismatch(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _MISMATCH


def _check_field(cls: type, field: dataclasses.Field, value: Any, source: str) -> Any:
    """``value`` converted to the field's annotated type; a ValueError naming the source, key, value and type."""
    annotation = _field_types(cls).get(field.name, Any)
    coerced = _coerce(value, annotation)
    if coerced is not _MISMATCH:
        return coerced
    default = f" (default {_as_json(field.default)})" if field.default is not dataclasses.MISSING else ""
    hint = ""
    if isinstance(value, str) and _coerce(_parsed_or_mismatch(value), annotation) is not _MISMATCH:
        hint = f": write {_as_json(field.name)}: {value} without the quotes"  # "2" for 2, a common hand edit
    raise ValueError(
        f"{source}: {_as_json(field.name)}: {_as_json(value)} is a JSON {_json_kind(value)}, but "
        f"{cls.__name__}.{field.name} must be {_describe_type(annotation)}{default}; correct it in the file{hint}"
    )


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "<dict>") -> C:
    """Build the dataclass ``cls`` from a ``config.json`` mapping.

    Args:
        cls: a dataclass type whose field names are config keys.
        data: the parsed JSON object.
        source: where ``data`` came from, for messages.

    Raises:
        ValueError: ``data`` is not a mapping, a value does not have its field's type (int, float, bool, str, a list
            of them, or null where the field allows None), or the config refuses a value.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a config must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in fields and not k.startswith("_"))
    if unknown:
        logger.warning("%s: ignoring config keys %s that %s does not use", source, unknown, cls.__name__)
    kwargs = {k: _check_field(cls, fields[k], _freeze(v), source) for k, v in data.items() if k in fields}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: invalid {cls.__name__}: {err}") from err


def read_config(folder: str | Path, cls: type[C], filename: str = "config.json") -> C:
    """Read ``folder/filename`` into ``cls``; errors name the file and what is wrong with it."""
    path = Path(folder) / filename
    data = read_json(path, what=f"the {filename} of a model folder in the published layout, next to its weights")
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
    reference's, which equal the 2B's). The five published models' values are in :mod:`cogvideox.presets`."""

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
    checkpoint names). The published files set every key (``cogvideox.presets.SCHEDULER_2B`` and ``SCHEDULER_5B``).

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
    1.5 0.7) and ``invert_scale_latents`` (true for 1.5).
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
    vocab 32128, ``feed_forward_proj="gated-gelu"`` (the config of google/t5-v1_1-xxl)."""

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
