"""Device and dtype defaults and the names users type for them."""

import pytest
import torch

from csm import devices
from csm.devices import Capabilities


def test_the_best_available_device_is_chosen(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert devices.default_device() == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.default_device() == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.default_device() == torch.device("cuda")


def test_csm_runs_in_bfloat16_where_the_hardware_has_it_else_float32():
    """A T4 or V100 emulates bf16 (torch.cuda.is_bf16_supported() says True for it unless asked
    including_emulation=False): those run float32, as do Macs before macOS 14."""
    assert devices.dtype_for(Capabilities("cuda", native_bf16=True)) == torch.bfloat16
    assert devices.dtype_for(Capabilities("cuda", native_bf16=False, name="Tesla T4")) == torch.float32
    assert devices.dtype_for(Capabilities("mps", native_bf16=False)) == torch.float32
    assert devices.dtype_for(Capabilities("mps", native_bf16=True)) == torch.bfloat16
    assert devices.default_dtype("cpu") == torch.bfloat16
    assert devices.capabilities("cpu") == Capabilities("cpu", True, "cpu")


def test_bfloat16_is_refused_on_mps_before_macos_14_and_warned_of_where_emulated():
    with pytest.raises(ValueError, match="bfloat16 on MPS needs macOS 14 or newer: use dtype float32"):
        devices.check_dtype(Capabilities("mps", native_bf16=False), torch.bfloat16)
    with pytest.warns(UserWarning, match="Tesla T4 has no native bfloat16 .* emulated"):
        devices.check_dtype(Capabilities("cuda", native_bf16=False, name="Tesla T4"), torch.bfloat16)
    for kind in ("mps", "cuda"):
        devices.check_dtype(Capabilities(kind, native_bf16=False), torch.float32)  # silent
        devices.check_dtype(Capabilities(kind, native_bf16=True), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_each_cuda_device_is_asked_about_itself():
    """Native bf16 is compute capability 8.0 or newer, on the device named, not the current one."""
    for index in range(torch.cuda.device_count()):
        native = torch.cuda.get_device_capability(index)[0] >= 8
        assert devices.capabilities(f"cuda:{index}").native_bf16 == native
        assert devices.default_dtype(f"cuda:{index}") == (torch.bfloat16 if native else torch.float32)


def test_embedding_bag_runs_on_the_cpu():
    assert devices.embedding_bag_runs_on("cpu")


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
