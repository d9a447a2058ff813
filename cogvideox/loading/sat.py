"""The original SAT (SwissArmyTransformer) checkpoints: read, rename to the published keys, write as safetensors.

The key map is the one of diffusers' ``scripts/convert_cogvideox_to_diffusers.py`` (github.com/huggingface/diffusers;
CogVideo's ``tools/convert_weight_sat2hf.py`` is a copy of it):

- transformer (``mp_rank_00_model_states.pt``): strip ``model.diffusion_model.``; ``transformer.layers.N`` ->
  ``transformer_blocks.N``, ``attention`` -> ``attn1``, ``dense`` -> ``to_out.0``, ``mlp.dense_h_to_4h`` ->
  ``ff.net.0.proj``, ``mlp.dense_4h_to_h`` -> ``ff.net.2``, ``input_layernorm`` / ``post_attention_layernorm`` ->
  ``norm1.norm`` / ``norm2.norm``, ``transformer.final_layernorm`` -> ``norm_final``, ``time_embed.{0,2}`` ->
  ``time_embedding.linear_{1,2}`` (``ofs_embed`` likewise), ``mixins.patch_embed`` -> ``patch_embed``,
  ``mixins.final_layer.{norm_final,linear,adaLN_modulation.1}`` -> ``norm_out.norm``, ``proj_out``,
  ``norm_out.linear``, ``mixins.pos_embed.pos_embedding`` -> ``patch_embed.pos_embedding`` (learned only).
  Special: the fused ``query_key_value`` splits into ``to_q/k/v`` (equal row thirds);
  ``mixins.adaln_layer.{query,key}_layernorm_list.N`` -> ``transformer_blocks.N.attn1.norm_{q,k}``;
  ``mixins.adaln_layer.adaLN_modulations.N.1`` (12 chunks of D rows) -> ``norm1.linear`` = chunks 0-2 + 6-8 and
  ``norm2.linear`` = chunks 3-5 + 9-11. Dropped: ``embed_tokens``, ``freqs_sin``/``freqs_cos``, a fixed
  (2B sin-cos) ``pos_embedding``, LoRA ``matrix_A/B`` (load those with :func:`cogvideox.lora.load_lora`).
- VAE (``3d-vae.pt``): ``block.`` -> ``resnets.``, ``down.`` -> ``down_blocks.``, ``downsample`` ->
  ``downsamplers.0``, ``upsample`` -> ``upsamplers.0``, ``nin_shortcut`` -> ``conv_shortcut``,
  ``mid.block_{1,2}`` -> ``mid_block.resnets.{0,1}``, ``decoder.up.i`` -> ``decoder.up_blocks.(3 - i)``;
  ``loss*`` dropped.

Checkpoints are opened with ``torch.load(weights_only=True)`` only: a pickle cannot run code.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..atomic import usual_mode, write_component

logger = logging.getLogger(__name__)

SAT_PREFIX = "model.diffusion_model."
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_LAYER_RENAMES = (
    ("attention.query_key_value.", "attn1.qkv."),  # split below
    ("attention.dense.", "attn1.to_out.0."),
    ("mlp.dense_h_to_4h.", "ff.net.0.proj."),
    ("mlp.dense_4h_to_h.", "ff.net.2."),
    ("input_layernorm.", "norm1.norm."),
    ("post_attention_layernorm.", "norm2.norm."),
)
_TOP_RENAMES = (
    ("transformer.final_layernorm.", "norm_final."),
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("ofs_embed.0.", "ofs_embedding.linear_1."),
    ("ofs_embed.2.", "ofs_embedding.linear_2."),
    ("mixins.patch_embed.", "patch_embed."),
    ("mixins.final_layer.norm_final.", "norm_out.norm."),
    ("mixins.final_layer.linear.", "proj_out."),
    ("mixins.final_layer.adaLN_modulation.1.", "norm_out.linear."),
    ("mixins.pos_embed.pos_embedding", "patch_embed.pos_embedding"),
)
_QK_NORM = re.compile(r"^mixins\.adaln_layer\.(query|key)_layernorm_list\.(\d+)\.(weight|bias)$")
_ADALN = re.compile(r"^mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)$")
_DROPPED = ("embed_tokens", "freqs_sin", "freqs_cos", "position_embedding", ".matrix_A.", ".matrix_B.")


def read_sat_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a SAT / DeepSpeed checkpoint (``module`` / ``model`` / ``state_dict`` unwrapped), read with
    ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SAT checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for bad pickles; all mean the same to the caller
        raise ValueError(f"{path} cannot be read with torch.load(weights_only=True): {err}") from err
    for wrapper in ("module", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def sat_transformer_state_dict(sat: dict[str, torch.Tensor], *, learned_positions: bool) -> dict[str, torch.Tensor]:
    """SAT transformer keys -> published ``transformer/`` keys (see the module docstring).

    ``learned_positions``: keep ``pos_embedding`` (5B-I2V) instead of dropping the 2B's fixed sin-cos table."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sat.items():
        key = key.removeprefix(SAT_PREFIX)
        if any(d in key for d in _DROPPED) or (key.endswith("pos_embedding") and not learned_positions):
            continue
        if match := _LAYER.match(key):
            index, rest = match.groups()
            for old, new in _LAYER_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            else:
                raise ValueError(f"SAT key {key!r} is not part of the CogVideoX transformer key map")
            if rest.startswith("attn1.qkv."):
                leaf = rest[len("attn1.qkv.") :]
                for name, piece in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0), strict=True):
                    out[f"transformer_blocks.{index}.attn1.{name}.{leaf}"] = piece.clone()
            else:
                out[f"transformer_blocks.{index}.{rest}"] = tensor
        elif match := _QK_NORM.match(key):
            kind, index, leaf = match.groups()
            out[f"transformer_blocks.{index}.attn1.norm_{kind[0]}.{leaf}"] = tensor
        elif match := _ADALN.match(key):
            index, leaf = match.groups()
            chunks = tensor.chunk(12, dim=0)
            # SAT orders the 12 modulation vectors as (attn video x3, ff video x3, attn text x3, ff text x3).
            out[f"transformer_blocks.{index}.norm1.linear.{leaf}"] = torch.cat(chunks[0:3] + chunks[6:9])
            out[f"transformer_blocks.{index}.norm2.linear.{leaf}"] = torch.cat(chunks[3:6] + chunks[9:12])
        else:
            for old, new in _TOP_RENAMES:
                if key.startswith(old):
                    out[new + key[len(old) :]] = tensor
                    break
            else:
                raise ValueError(f"SAT key {key!r} is not part of the CogVideoX transformer key map")
    return out


def sat_vae_state_dict(sat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAT VAE keys (``3d-vae.pt``) -> published ``vae/`` keys (see the module docstring)."""
    out = {}
    for key, tensor in sat.items():
        if key.startswith("loss"):
            continue
        for old, new in (("block.", "resnets."), ("down.", "down_blocks."), ("downsample", "downsamplers.0"),
                         ("upsample", "upsamplers.0"), ("nin_shortcut", "conv_shortcut"),
                         ("mid.block_1", "mid_block.resnets.0"), ("mid.block_2", "mid_block.resnets.1")):  # fmt: skip
            key = key.replace(old, new)
        if match := re.match(r"^(encoder|decoder)\.up\.(\d+)\.(.+)$", key):
            # SAT numbers the decoder's up blocks from the lowest resolution; diffusers from the highest.
            part, index, rest = match.groups()
            key = f"{part}.up_blocks.{3 - int(index)}.{rest}"
        out[key] = tensor
    return out


def load_sat_transformer(
    checkpoint: str | Path,
    config: dict,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
):
    """A :class:`~cogvideox.Transformer` straight from a SAT checkpoint (no files written); ``config`` is the
    published ``transformer/config.json`` content of the same model (e.g. ``presets.TRANSFORMER_CONFIGS[name]``)."""
    from ..configs import TransformerConfig, config_from_dict
    from ..transformer import Transformer
    from .build import build_on_meta
    from .dtypes import check_dtype

    dtype = check_dtype(dtype)  # before the (large) checkpoint is read
    parsed = config_from_dict(TransformerConfig, config, "transformer config")
    state = sat_transformer_state_dict(
        read_sat_checkpoint(checkpoint), learned_positions=parsed.use_learned_positional_embeddings
    )
    _check_loads(Transformer, parsed, state, checkpoint)
    model = build_on_meta(lambda: Transformer(parsed))
    state = {k: v.to(device=device, dtype=dtype if dtype is not None else v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def convert_sat(
    transformer_checkpoint: str | Path | None,
    output: str | Path,
    *,
    transformer_config: dict,
    vae_checkpoint: str | Path | None = None,
    vae_config: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``output/transformer`` (and ``output/vae``) in the published layout from SAT checkpoints.

    The converted weights are checked by loading them strictly into our models before anything is written; the
    folder appears whole (written to a temporary folder beside it, then renamed). Returns ``output``.
    """
    from ..configs import TransformerConfig, VAEConfig, config_from_dict
    from ..transformer import Transformer
    from ..vae import VAE

    output = Path(output)
    if output.exists():
        raise FileExistsError(f"{output} already exists: choose a new output folder")
    components: list[tuple[str, dict, dict, str]] = []
    if transformer_checkpoint is not None:
        config = config_from_dict(TransformerConfig, transformer_config, "transformer config")
        state = sat_transformer_state_dict(
            read_sat_checkpoint(transformer_checkpoint), learned_positions=config.use_learned_positional_embeddings
        )
        _check_loads(Transformer, config, state, transformer_checkpoint)
        components.append(("transformer", transformer_config, state, "diffusion_pytorch_model.safetensors"))
    if vae_checkpoint is not None:
        config = config_from_dict(VAEConfig, vae_config or {}, "vae config")
        state = sat_vae_state_dict(read_sat_checkpoint(vae_checkpoint))
        _check_loads(VAE, config, state, vae_checkpoint)
        components.append(("vae", vae_config or {}, state, "diffusion_pytorch_model.safetensors"))
    if not components:
        raise ValueError("nothing to convert: give a transformer checkpoint, a VAE checkpoint, or both")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        for name, config, state, weights_name in components:
            if dtype is not None:
                state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            write_component(staging / name, config, state, weights_name)
        os.chmod(staging, usual_mode(output.parent, directory=True))  # mkdtemp's folder is private (0700)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s (%s)", output, ", ".join(c[0] for c in components))
    return output


def _check_loads(cls, config, state: dict[str, torch.Tensor], source) -> None:
    """Strictly load ``state`` into a meta-device model: names every missing, unexpected or misshaped key."""
    from .build import build_on_meta

    model = build_on_meta(lambda: cls(config))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or misshaped:
        raise ValueError(
            f"{source} does not match the given config after conversion: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, misshaped {misshaped[:5]} (check the config: model size, variant, num_layers)"
        )
