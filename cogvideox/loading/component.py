"""The one body of every component's ``from_pretrained``: find the folder, read its config, build on meta, load.

``Transformer``, ``VAE`` and ``T5Encoder`` call :func:`load_component` with their own class and config class; the
T5 encoder also passes its hooks (how its config is read, how its file keys map to its own, which weights stay
float32). This module never imports a model: it builds what it is given, so the models can sit above it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from ..configs import read_config
from .build import KeyRename, build_on_meta, load_weights
from .dtypes import check_dtype
from .hub import component_folder

M = TypeVar("M", bound=nn.Module)
C = TypeVar("C")


def load_component(
    cls: Callable[[C], M],
    config_class: type[C],
    path_or_hub_id: str | Path,
    subfolder: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
    config_reader: Callable[[Path], C] | None = None,
    rename: Callable[[Path], KeyRename | None] | None = None,
    keep_float32: Callable[[str, torch.dtype | None], bool] | None = None,
    finish: Callable[[M], M] | None = None,
    **hub_kwargs: Any,
) -> M:
    """Load the component ``cls`` from its folder, a pipeline folder holding ``subfolder``, or a hub id.

    The dtype is checked first (:func:`check_dtype`), so a wrong one fails before any download. The model is built
    on the meta device from the folder's config and filled strictly from its weight files, straight into ``dtype``
    on ``device`` (see :func:`load_weights`).

    Args:
        cls: the module class; ``cls(config)`` builds it.
        config_class: the config dataclass read from ``config.json``.
        path_or_hub_id: the component folder, the pipeline folder that contains ``subfolder``, or a hub id.
        subfolder: the component's folder in a pipeline (``"transformer"``, ``"vae"``, ``"text_encoder"``).
        dtype: see :func:`check_dtype`; None keeps the files' dtype.
        device: where the weights go; default CPU. ``"meta"``: nothing is read, the model comes back on the meta
            device with the dtypes loading would give it (what the memory plan measures before loading).
        allow_pickle: accept ``.bin``/``.pt`` weights, read with ``torch.load(weights_only=True)``.
        config_reader: reads the config from the component folder instead of ``read_config(folder, config_class)``.
        rename: given the component folder, the file-key to model-key map (None: keys as stored).
        keep_float32: ``(model key, checked dtype) -> True`` for floating weights that stay float32.
        finish: applied to the loaded model, which it returns.
        hub_kwargs: ``revision``, ``cache_dir``, ``local_files_only``, ``token`` for the hub download.
    """
    dtype = check_dtype(dtype)
    folder = component_folder(path_or_hub_id, subfolder, **hub_kwargs)
    config = config_reader(folder) if config_reader is not None else read_config(folder, config_class)
    model = build_on_meta(lambda: cls(config))
    if device is not None and torch.device(device).type == "meta":
        # The model as loading would leave it, without reading a weight: what a memory plan measures before it
        # decides where the weights go.
        model = _cast_on_meta(model, dtype, keep_float32).eval()
        return finish(model) if finish is not None else model
    model = load_weights(
        model,
        folder,
        dtype=dtype,
        device=device,
        allow_pickle=allow_pickle,
        rename=rename(folder) if rename is not None else None,
        keep_float32=(lambda key: keep_float32(key, dtype)) if keep_float32 is not None else None,
    )
    return finish(model) if finish is not None else model


def _cast_on_meta(
    model: M, dtype: torch.dtype | None, keep_float32: Callable[[str, torch.dtype | None], bool] | None
) -> M:
    """Floating tensors of a meta-built ``model`` in ``dtype`` (float32 where ``keep_float32`` says), as
    :func:`load_weights` would cast them."""
    if dtype is None:
        return model
    for key, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            keep = keep_float32 is not None and keep_float32(key, dtype)
            tensor.data = tensor.data.to(torch.float32 if keep else dtype)
    return model
