import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """GPU tests are opt-in (-m gpu) and skip themselves where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Every test starts from the same global seed and single-thread-free defaults it may rely on."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def demo_pipe():
    """The bundled demo model's pipeline, loaded once per test module (under a second), progress bars off. Tests
    that switch something on (a cache, offload, a LoRA) switch it off again."""
    from cogvideox import Pipeline

    pipe = Pipeline.from_pretrained()
    pipe.set_progress_bar_config(disable=True)
    return pipe
