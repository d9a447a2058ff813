"""LoRA switches given bad or pointless input: non-finite adapter weights are refused naming the value (they would
turn every output into NaN or inf); undoing what is not there (unfuse with nothing fused, unload with nothing
loaded) is a no-op that says so in the debug log."""

from __future__ import annotations

import logging

import pytest
import torch

from cogvideox.lora import fuse_lora, load_lora, loaded_adapters, lora_layers, set_adapters, unfuse_lora, unload_lora
from tests.unit.test_lora import assert_unchanged, inputs, lora_tensors, make, snapshot

NON_FINITE = [float("nan"), float("inf"), float("-inf")]
LOGGER = "cogvideox.lora.adapters"


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
def test_load_lora_refuses_a_non_finite_scale_and_names_it(value):
    model = make()
    before = snapshot(model)
    message = rf"load_lora\(scale={value!r}\): an adapter weight must be a finite number, e.g. 1.0"
    with pytest.raises(ValueError, match=message):
        load_lora(model, lora_tensors(), scale=value)
    assert_unchanged(model, before)
    assert loaded_adapters(model) == {}


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
def test_set_adapters_refuses_a_non_finite_weight_and_names_it(value):
    model = make()
    load_lora(model, lora_tensors(), adapter_name="a")
    load_lora(model, lora_tensors(seed=1), adapter_name="b", scale=0.5)
    message = rf"set_adapters\(\): weight {value!r} for 'b': an adapter weight must be a finite number"
    with pytest.raises(ValueError, match=message):
        set_adapters(model, ["a", "b"], [0.3, value])
    with pytest.raises(ValueError, match=message):
        set_adapters(model, "b", value)
    assert loaded_adapters(model) == {"a": 1.0, "b": 0.5}


@pytest.mark.parametrize("value", NON_FINITE, ids=repr)
def test_fuse_lora_refuses_a_non_finite_scale_and_names_it(value):
    model = make()
    load_lora(model, lora_tensors())
    before = snapshot(model)
    message = rf"fuse_lora\(lora_scale={value!r}\): an adapter weight must be a finite number"
    with pytest.raises(ValueError, match=message):
        fuse_lora(model, lora_scale=value)
    assert_unchanged(model, before)
    assert not any(layer.is_fused for layer in lora_layers(model).values())


def test_unfuse_lora_with_nothing_fused_is_a_no_op_logged_at_debug(caplog):
    model = make()
    args = inputs()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    before = snapshot(model)
    unfuse_lora(model)  # nothing loaded
    assert_unchanged(model, before)
    load_lora(model, lora_tensors())
    with torch.no_grad():
        expected = model(*args)
    fuse_lora(model)
    unfuse_lora(model)
    caplog.clear()
    unfuse_lora(model)  # twice: the second has nothing to unfuse
    with torch.no_grad():
        assert torch.equal(model(*args), expected)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "unfuse_lora(): nothing to unfuse (no LoRA is fused into the weights)")
    ]


def test_unload_lora_with_nothing_loaded_is_a_no_op_logged_at_debug(caplog):
    model = make()
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    before = snapshot(model)
    load_lora(model, lora_tensors())
    unload_lora(model)
    caplog.clear()
    unload_lora(model)  # twice: the second has nothing to unload
    assert_unchanged(model, before)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, "unload_lora(): nothing to unload (no LoRA is loaded)")
    ]
