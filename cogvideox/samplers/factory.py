"""Build a sampler from a checkpoint's ``scheduler/scheduler_config.json`` (or a config), DDIM or DPM.

By default the sampler is the one the file names in ``_class_name``; ``kind="ddim" | "dpm"`` picks the other with
the same schedule, and keyword overrides change single keys, e.g. the official demo's choice for every model:

    sampler = make_sampler("THUDM/CogVideoX-5b", kind="dpm", timestep_spacing="trailing")
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..configs import SchedulerConfig, config_from_dict, read_json
from .base import Sampler
from .ddim import DDIMSampler
from .dpm import DPMSampler

logger = logging.getLogger(__name__)

SAMPLERS: dict[str, type[Sampler]] = {"ddim": DDIMSampler, "dpm": DPMSampler}
KIND_OF_CLASS: dict[str, str] = {cls.reference_class: kind for kind, cls in SAMPLERS.items()}
CONFIG_FILENAME = "scheduler_config.json"


def _find_config_file(path_or_hub_id: str | Path) -> Path:
    """``scheduler_config.json`` itself, the ``scheduler/`` folder, or a pipeline root / hub id containing it."""
    local = Path(path_or_hub_id).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        for candidate in (local / CONFIG_FILENAME, local / "scheduler" / CONFIG_FILENAME):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"{local} has neither {CONFIG_FILENAME} nor scheduler/{CONFIG_FILENAME}: give a pipeline folder in the "
            "published layout, its scheduler/ folder, or the json file"
        )
    from ..loading import component_folder  # only for hub ids; local paths never reach here

    return component_folder(str(path_or_hub_id), "scheduler", allow_patterns=("*.json",)) / CONFIG_FILENAME


def load_scheduler_config(path_or_hub_id: str | Path) -> tuple[SchedulerConfig, str | None]:
    """Read a ``scheduler_config.json``; returns the config and the ``_class_name`` it carries (or ``None``)."""
    path = _find_config_file(path_or_hub_id)
    data = read_json(path, what=f"the scheduler config of a pipeline (scheduler/{CONFIG_FILENAME} in its folder)")
    return _config_from_mapping(data, str(path))


def _config_from_mapping(data: Mapping[str, Any], source: str) -> tuple[SchedulerConfig, str | None]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: a scheduler config must be a JSON object, got {type(data).__name__}")
    class_name = data.get("_class_name")
    # Both reference classes have the same constructor defaults (their docstrings claim other DPM defaults, but the
    # signatures agree), so a file that leaves keys out means the same schedule for both.
    return config_from_dict(SchedulerConfig, dict(data), source=source), class_name


def make_sampler(
    config: SchedulerConfig | Mapping[str, Any] | str | Path | None = None,
    kind: str | None = None,
    **overrides: Any,
) -> Sampler:
    """A :class:`DDIMSampler` or :class:`DPMSampler`.

    Args:
        config: a pipeline folder, its ``scheduler/`` folder, a ``scheduler_config.json`` path, a hub id, the
            parsed JSON, or a :class:`SchedulerConfig` (``None``: the defaults).
        kind: ``"ddim"`` or ``"dpm"``; ``None`` takes the class the file names (``CogVideoXDDIMScheduler`` or
            ``CogVideoXDPMScheduler``), and DDIM when there is none (a :class:`SchedulerConfig` carries no class).
        overrides: config keys to change, e.g. ``timestep_spacing="trailing"``.
    """
    class_name: str | None = None
    if config is None:
        config = SchedulerConfig()
    elif isinstance(config, Mapping):
        config, class_name = _config_from_mapping(config, "<dict>")
    elif isinstance(config, (str, Path)):
        config, class_name = load_scheduler_config(config)
    elif not isinstance(config, SchedulerConfig):
        raise TypeError(
            f"make_sampler(config=...) takes a SchedulerConfig, a dict, a path or a hub id, not {type(config).__name__}"
        )

    if kind is None:
        if class_name is None:
            kind = "ddim"
        elif class_name in KIND_OF_CLASS:
            kind = KIND_OF_CLASS[class_name]
        else:
            raise ValueError(
                f"the scheduler config names {class_name!r}, which cogvideox does not implement: pass kind='ddim' or "
                f"kind='dpm' to sample with {list(KIND_OF_CLASS)} on this schedule"
            )
    if kind not in SAMPLERS:
        raise ValueError(f"kind={kind!r} is not a sampler: choose one of {list(SAMPLERS)}")

    if overrides:
        fields = {f.name for f in dataclasses.fields(SchedulerConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(f"unknown scheduler config keys {unknown}: the keys are {sorted(fields)}")
        config = dataclasses.replace(config, **overrides)
    sampler = SAMPLERS[kind](config)
    logger.debug("built %r", sampler)
    return sampler


def choose_sampler(choice: Any, schedule: SchedulerConfig | str | Path | None = None, **overrides: Any) -> Any:
    """The sampler a pipeline asked for: ``choice`` a name (``"ddim"`` / ``"dpm"``) or None builds one on
    ``schedule`` (a checkpoint folder, a ``scheduler_config.json`` or a :class:`SchedulerConfig`, as
    :func:`make_sampler` takes it) with ``overrides``; any other object is a sampler brought by the caller, checked
    against :class:`cogvideox.protocols.Sampler` and returned as it is."""
    from ..protocols import check_sampler  # the protocol module holds no model code

    if choice is None or isinstance(choice, str):
        if schedule is None:
            raise ValueError(
                f"sampler {choice!r} is built on a checkpoint's schedule, and there is none here (the current "
                "sampler has no scheduler config): pass make_sampler(checkpoint_folder, kind=...) instead"
            )
        return make_sampler(schedule, kind=choice, **overrides)
    check_sampler(choice)
    if overrides:
        raise ValueError(
            f"sampler overrides {sorted(overrides)} apply to a sampler built from the checkpoint; with a sampler "
            f"object ({type(choice).__name__}) configure it before passing it"
        )
    return choice
