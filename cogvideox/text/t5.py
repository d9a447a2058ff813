"""The T5 encoder (T5 v1.1 XXL in CogVideoX): token ids ``[B, L]`` to text embeddings ``[B, L, d_model]``.

    ids -> shared embedding (no scaling, no absolute positions)
        -> num_layers x [ x + SelfAttention(RMSNorm(x), + relative position bias);  x + FeedForward(RMSNorm(x)) ]
        -> RMSNorm -> [B, L, d_model]

Numerics follow transformers' ``T5EncoderModel`` (modeling_t5.py):
- attention has no 1/sqrt(d) scaling (T5 folds it into the initialisation) and adds a learned bias per head,
  indexed by bidirectional relative-position buckets; only the first layer owns the bias table, all layers use it;
- the RMS norm computes its statistic in float32 and casts back to the weight's dtype before scaling;
- in float16 the hidden states are clamped below the float16 maximum after each sub-layer (the reference's guard
  against inf);
- when loaded in float16, the feed-forward output projections ``wo`` stay in float32 (``_keep_in_fp32_modules``,
  transformers issue 20287) and the activations are cast up to meet them. Not in bfloat16.

Keys are the published ones (``shared.weight``, ``encoder.block.N.layer.0.SelfAttention.q.weight``, ...). Files that
store the embedding as ``encoder.embed_tokens.weight`` (or both, tied) load too, and a full T5 checkpoint's
``decoder.*`` / ``lm_head.*`` tensors are skipped, as the reference skips them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import T5_UNUSED_CONFIG_KEYS, T5Config, config_from_dict, read_json
from ..loading import load_component
from ..ops import attention, attention_sdpa, get_attention_backend

logger = logging.getLogger(__name__)

# Backends of cogvideox.ops that accept the additive position bias T5 needs; any other choice runs sdpa here.
_BIAS_BACKENDS = ("sdpa", "math")


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """Bucket of every (query, key) offset, ``[L, L]`` int64, bidirectional (the encoder's case).

    Half the buckets are for keys after the query, half for keys before. Within a half, offsets below
    ``num_buckets // 4`` get their own bucket; larger ones share logarithmically wider buckets up to
    ``max_distance``, and all offsets beyond it share the last one (Mesh TensorFlow's scheme, as in the reference).
    """
    half = num_buckets // 2
    exact = half // 2
    position = torch.arange(length, dtype=torch.long, device=device)
    offset = position[None, :] - position[:, None]  # key - query
    buckets = (offset > 0).to(torch.long) * half
    distance = offset.abs()
    # Same float32 expression, in the same order, as the reference, so the truncation to an integer lands on the
    # same side at every bucket edge. The clamp only avoids log(0) where the exact branch is taken anyway.
    scaled = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact) * (half - exact)
    logarithmic = torch.clamp(exact + scaled.to(torch.long), max=half - 1)
    return buckets + torch.where(distance < exact, distance, logarithmic)


class T5LayerNorm(nn.Module):
    """RMS norm without mean or bias: ``weight * x / sqrt(mean(x^2) + eps)``, the statistic in float32."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        # The reference casts back only to half weights; with float32 weights a half input comes out float32.
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def _gelu_tanh_formula(x: torch.Tensor) -> torch.Tensor:
    # transformers' "gelu_new" is written out op by op; half-precision results depend on that order, so keep it.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh_formula,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
}


class T5FeedForward(nn.Module):
    """``wo(act(wi_0 x) * wi_1 x)`` (gated, T5 v1.1) or ``wo(act(wi x))`` (original T5); no biases."""

    def __init__(self, config: T5Config, device=None, dtype=None) -> None:
        super().__init__()
        d, ff = config.d_model, config.d_ff
        self.gated = config.is_gated_act
        if self.gated:
            self.wi_0 = nn.Linear(d, ff, bias=False, device=device, dtype=dtype)
            self.wi_1 = nn.Linear(d, ff, bias=False, device=device, dtype=dtype)
        else:
            self.wi = nn.Linear(d, ff, bias=False, device=device, dtype=dtype)
        self.wo = nn.Linear(ff, d, bias=False, device=device, dtype=dtype)
        self.act = ACTIVATIONS[config.dense_act_fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        # wo may be float32 under float16 weights (see the module docstring): meet it in its dtype.
        return self.wo(h.to(self.wo.weight.dtype))


class T5SelfAttention(nn.Module):
    """Multi-head self-attention with an additive bias ``[B or 1, H, L, L]`` and no score scaling."""

    def __init__(self, config: T5Config, has_position_bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.heads, self.head_dim = config.num_heads, config.d_kv
        inner = config.inner_dim
        self.q = nn.Linear(config.d_model, inner, bias=False, device=device, dtype=dtype)
        self.k = nn.Linear(config.d_model, inner, bias=False, device=device, dtype=dtype)
        self.v = nn.Linear(config.d_model, inner, bias=False, device=device, dtype=dtype)
        self.o = nn.Linear(inner, config.d_model, bias=False, device=device, dtype=dtype)
        if has_position_bias:
            self.relative_attention_bias = nn.Embedding(
                config.relative_attention_num_buckets, config.num_heads, device=device, dtype=dtype
            )

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x ``[B, L, D]``, bias ``[B or 1, H, L, L]`` (position bias plus mask) -> ``[B, L, D]``."""
        b, length, _ = x.shape
        q, k, v = (
            proj(x).view(b, length, self.heads, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v)
        )
        run = attention if get_attention_backend() in _BIAS_BACKENDS else attention_sdpa
        out = run(q, k, v, attn_mask=bias, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, length, self.heads * self.head_dim))


def _clamp_float16(x: torch.Tensor) -> torch.Tensor:
    """The reference's float16 guard: clamp to +-(max - 1000) if any value is inf, else to +-max.

    ``torch.where`` keeps the choice on the device (no host sync), as the reference does.
    """
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, min=-limit, max=limit)


class T5SelfAttentionLayer(nn.Module):
    """``x + SelfAttention(layer_norm(x))``; keys ``layer.0.SelfAttention.*``, ``layer.0.layer_norm``."""

    def __init__(self, config: T5Config, has_position_bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.SelfAttention = T5SelfAttention(config, has_position_bias, device=device, dtype=dtype)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5FeedForwardLayer(nn.Module):
    """``x + DenseReluDense(layer_norm(x))``; keys ``layer.1.DenseReluDense.*``, ``layer.1.layer_norm``."""

    def __init__(self, config: T5Config, device=None, dtype=None) -> None:
        super().__init__()
        self.DenseReluDense = T5FeedForward(config, device=device, dtype=dtype)
        self.layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    """One encoder layer: ``layer`` = [self-attention sub-layer, feed-forward sub-layer]."""

    def __init__(self, config: T5Config, has_position_bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            [
                T5SelfAttentionLayer(config, has_position_bias, device=device, dtype=dtype),
                T5FeedForwardLayer(config, device=device, dtype=dtype),
            ]
        )

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = _clamp_float16(self.layer[0](x, bias))
        return _clamp_float16(self.layer[1](x))


class T5Stack(nn.Module):
    """The layers and the final norm; keys ``encoder.block.N.*``, ``encoder.final_layer_norm.weight``."""

    def __init__(self, config: T5Config, device=None, dtype=None) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            [T5Block(config, has_position_bias=i == 0, device=device, dtype=dtype) for i in range(config.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, config.layer_norm_epsilon, device=device, dtype=dtype)


def read_t5_config(folder: str | Path) -> T5Config:
    """``folder/config.json`` as a :class:`T5Config`; keys an encoder never uses are dropped quietly."""
    path = Path(folder) / "config.json"
    data = read_json(path, what="the config.json of a T5 text_encoder folder, next to its weights")
    unused = sorted(k for k in data if k in T5_UNUSED_CONFIG_KEYS)
    if unused:
        logger.debug("%s: keys %s do not affect the encoder", path, unused)
    return config_from_dict(T5Config, {k: v for k, v in data.items() if k not in T5_UNUSED_CONFIG_KEYS}, str(path))


def _stored_keys(folder: Path, allow_pickle: bool) -> set[str] | None:
    """Names of the tensors in the safetensors files of ``folder`` (headers only), or None for pickle files."""
    from safetensors import safe_open

    from ..loading import find_weight_files

    keys: set[str] = set()
    for path in find_weight_files(folder, allow_pickle=allow_pickle):
        if path.suffix != ".safetensors":
            return None
        with safe_open(str(path), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _checkpoint_rename(stored: set[str] | None) -> Callable[[str], str | None]:
    """File key -> model key: the embedding may be stored as ``shared.weight``, ``encoder.embed_tokens.weight`` or
    both (tied, one tensor); ``shared.weight`` wins, as the reference ties the other to it. Decoder and LM-head
    tensors of a full T5 checkpoint are skipped (the reference's ``_keys_to_ignore_on_load_unexpected``)."""
    embed_key = "encoder.embed_tokens.weight"
    take_embed = stored is not None and "shared.weight" not in stored
    seen_embedding = False

    def rename(key: str) -> str | None:
        nonlocal seen_embedding
        if key.startswith(("decoder.", "lm_head.")):
            return None
        if key == embed_key and stored is not None:
            return "shared.weight" if take_embed else None
        if key in ("shared.weight", embed_key):  # pickle files: no header to look at, keep the first one seen
            if seen_embedding:
                return None
            seen_embedding = True
            return "shared.weight"
        return key

    return rename


class T5Encoder(nn.Module):
    """Encoder half of T5 (``transformers.T5EncoderModel``); keys and shapes are the published ``text_encoder/``.

    ``forward(input_ids [B, L], attention_mask=None) -> [B, L, d_model]``. The CogVideoX pipelines run it without
    a mask on prompts padded to 226 tokens, so the padding is attended to; pass the tokenizer's mask to exclude it.
    """

    def __init__(self, config: T5Config, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model, device=device, dtype=dtype)
        self.encoder = T5Stack(config, device=device, dtype=dtype)
        self._bucket_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | Path,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        allow_pickle: bool = False,
        **hub_kwargs,
    ) -> T5Encoder:
        """Load from a ``text_encoder/`` folder, a pipeline folder that contains one, or a hub id.

        Weights go straight from the (sharded) files into ``dtype`` on ``device``, one tensor at a time (default:
        the file's dtype, on the CPU). In float16 the ``wo`` projections stay float32, as in the reference.
        ``hub_kwargs``: ``revision``, ``cache_dir``, ``local_files_only``, ``token``.
        """
        return load_component(
            cls, T5Config, path_or_hub_id, "text_encoder",
            dtype=dtype, device=device, allow_pickle=allow_pickle,
            config_reader=read_t5_config,
            rename=lambda folder: _checkpoint_rename(_stored_keys(folder, allow_pickle)),
            # float16 asked for: load wo from the files straight into float32 (exact, as the reference does) ...
            keep_float32=lambda key, dtype: dtype == torch.float16 and key.endswith(".DenseReluDense.wo.weight"),
            # ... and float16 files loaded as stored (dtype=None) follow the same rule after loading (also exact).
            finish=lambda model: model.keep_wo_in_float32() if model.dtype == torch.float16 else model,
            **hub_kwargs,
        )  # fmt: skip

    def keep_wo_in_float32(self) -> T5Encoder:
        """Put the feed-forward output projections in float32 (the reference's rule for float16 weights)."""
        for block in self.encoder.block:
            ff = block.layer[1].DenseReluDense
            ff.wo.weight = nn.Parameter(ff.wo.weight.float(), requires_grad=ff.wo.weight.requires_grad)
        return self

    def offload_blocks(self) -> nn.ModuleList:
        """The encoder layers: what sequential offload streams one at a time (the embedding and the final norm
        move with the module)."""
        return self.encoder.block

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the embedding (the ``wo`` projections may be float32 under float16, see the module docstring)."""
        return self.shared.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.shared.weight.device

    def position_bias(self, length: int, device: torch.device | None = None) -> torch.Tensor:
        """Relative position bias of the first layer, shared by all layers: ``[1, H, L, L]`` in the weights' dtype,
        on ``device`` (default: the table's).

        The table lives in block 0, which sequential offload keeps in host memory until block 0 runs, i.e. after
        this is computed: so the (tiny, ``[buckets, H]``) table is brought to the hidden states' device, rather
        than the ``[H, L, L]`` bias computed on the host next to device q/k/v."""
        weight = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        device = weight.device if device is None else torch.device(device)
        key = (length, device)
        if key not in self._bucket_cache:
            self._bucket_cache[key] = relative_position_buckets(
                length,
                self.config.relative_attention_num_buckets,
                self.config.relative_attention_max_distance,
                device=device,
            )
        # copy=True: a copy even when the table is on ``device`` already (4 KiB for T5-XXL), so that the CPU tests,
        # where the offload "device" is the host too, see the same data flow as CUDA (tests/unit/test_streaming.py).
        bias = F.embedding(self._bucket_cache[key], weight.to(device, non_blocking=True, copy=True))
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer tensor [B, L], got {input_ids.dtype} of shape {list(input_ids.shape)}"
            )
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)}): tokenize at least one prompt")
        low, high = int(input_ids.min()), int(input_ids.max())  # one host sync; the encoder runs once per prompt
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size}) of this "
                "text encoder: use the tokenizer that belongs to this checkpoint"
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode token ids.

        Args:
            input_ids: ``[B, L]`` int64 ids on the model's device.
            attention_mask: optional ``[B, L]``, nonzero on tokens to attend to. None (the pipelines' choice)
                attends to every position, padding included.

        Returns:
            ``[B, L, d_model]`` in the model's dtype.
        """
        self._check_ids(input_ids)
        x = self.shared(input_ids)
        bias = self.position_bias(input_ids.shape[1], x.device)
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}: "
                    "they must match"
                )
            keep = attention_mask.to(device=bias.device, dtype=torch.bool)[:, None, None, :]
            bias = torch.where(keep, bias, torch.finfo(bias.dtype).min)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
