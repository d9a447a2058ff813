"""What a notebook user reads: ``help(Pipeline.__call__)`` documents every argument, and ``repr(demo_pipe)`` names the
model, its dtype and device, and every switch that is on."""

from __future__ import annotations

import inspect

from cogvideox import Pipeline


def test_call_docstring_documents_every_argument():
    doc = inspect.getdoc(Pipeline.__call__)
    names = [n for n in inspect.signature(Pipeline.__call__).parameters if n != "self"]
    missing = [n for n in names if n not in doc]
    assert not missing, f"undocumented arguments: {missing}"
    assert len(doc.splitlines()) > 40


def test_repr_names_model_dtype_device_and_switches(demo_pipe):
    assert repr(demo_pipe).splitlines() == [
        "Pipeline(the bundled demo model: text-to-video / video-to-video, 6 layers, torch.float32, cpu)",
        "  sampler: DDIMSampler",
        "  switches: none",
    ]
    demo_pipe.enable_cache("first_block", threshold=0.2)
    demo_pipe.enable_model_cpu_offload(device="cpu")
    try:
        assert repr(demo_pipe).splitlines()[-1] == (
            "  switches: model CPU offload; step cache FirstBlockCache(threshold=0.2)"
        )
    finally:
        demo_pipe.disable_cpu_offload()
        demo_pipe.disable_cache()
