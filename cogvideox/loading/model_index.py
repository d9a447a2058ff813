"""``model_index.json``: which pipeline class a checkpoint folder was saved for.

The pipeline classes accepted are diffusers' four CogVideoX pipelines (``diffusers/pipelines/cogvideo/``): their
folders hold the same five components in the same layout, which is all the loader reads. Only
``CogVideoXImageToVideoPipeline`` and ``CogVideoXFunControlPipeline`` change how the checkpoint is used (their
transformers take image latents, or control-video latents, after the noise): both have 32 input channels, which is
why the class name matters (:func:`is_image_to_video`, :func:`is_control`). Any other class (another model
family, or a CogVideoX-Fun inpainting folder, whose transformer takes a mask as well) is refused instead of being
run wrongly. A folder without ``model_index.json`` (a hand-assembled one) is allowed: the pipeline then infers
image-to-video from the transformer's input channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..configs import read_json

MODEL_INDEX = "model_index.json"
# diffusers' CogVideoX pipeline classes -> what the folder is for.
PIPELINE_CLASSES = {
    "CogVideoXPipeline": "text-to-video",
    "CogVideoXImageToVideoPipeline": "image-to-video",
    "CogVideoXVideoToVideoPipeline": "video-to-video",
    "CogVideoXFunControlPipeline": "CogVideoX-Fun control video",
}
I2V_PIPELINE_CLASSES = ("CogVideoXImageToVideoPipeline",)


def read_model_index(root: str | Path) -> dict[str, Any] | None:
    """The checked ``model_index.json`` of the pipeline folder ``root``, or None when there is none.

    A file without ``_class_name`` is returned as is (nothing to check; the pipeline infers the task).

    Raises:
        ValueError: the file is not a JSON object, or ``_class_name`` is not one of :data:`PIPELINE_CLASSES`.
    """
    path = Path(root) / MODEL_INDEX
    if not path.is_file():
        return None
    index = read_json(path, what="the model_index.json of a CogVideoX pipeline folder (diffusers layout)")
    class_name = index.get("_class_name")
    if class_name is not None and (not isinstance(class_name, str) or class_name not in PIPELINE_CLASSES):
        raise ValueError(
            f"{path} names the pipeline class {class_name!r}, which is not a CogVideoX pipeline: cogvideox loads "
            f"folders saved for {list(PIPELINE_CLASSES)}. Check that this is a CogVideoX checkpoint; if it is one "
            "saved under another class name, set '_class_name' to the matching class above"
        )
    return index


CONTROL_PIPELINE_CLASSES = ("CogVideoXFunControlPipeline",)


def is_control(root: str | Path) -> bool:
    """True when ``root``'s ``model_index.json`` names ``CogVideoXFunControlPipeline`` (a CogVideoX-Fun control
    checkpoint: the transformer takes noise + control-video latents)."""
    index = read_model_index(root)
    return index is not None and index.get("_class_name") in CONTROL_PIPELINE_CLASSES


def is_image_to_video(root: str | Path) -> bool | None:
    """True when ``root``'s ``model_index.json`` names ``CogVideoXImageToVideoPipeline``, False for the other
    CogVideoX pipelines, None when the folder has no ``model_index.json`` or it names no class (then infer it from
    the transformer). Raises as :func:`read_model_index` does."""
    index = read_model_index(root)
    if index is None or index.get("_class_name") is None:
        return None
    return index["_class_name"] in I2V_PIPELINE_CLASSES
