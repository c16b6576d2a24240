"""Device and dtype defaults and the names users type for them."""

import pytest
import torch

from csm import devices


def test_the_best_available_device_is_chosen(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.default_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.default_device() == torch.device("cuda")


def test_csm_runs_in_bfloat16_unless_the_gpu_lacks_it(monkeypatch):
    assert devices.default_dtype("cpu") == torch.bfloat16
    assert devices.default_dtype(torch.device("mps")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devices.default_dtype("cuda") == torch.float32


def test_dtype_and_device_names(monkeypatch):
    assert devices.parse_dtype("bf16") == devices.parse_dtype("BFloat16") == torch.bfloat16
    assert devices.parse_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        devices.parse_dtype("int8")
    assert devices.parse_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        devices.parse_device("cuda:0")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        devices.parse_device("gpu")
