"""The one-row kernels (`csm.kernels`): every candidate computes the same product within bf16
rounding, and the choice comes from the cache file when it holds one, else from a measurement
that is then saved; a stale or corrupt file is ignored and rewritten."""

import json
import os
import subprocess
import sys

import pytest
import torch

from csm import kernels
from csm.kernels import LINEAR, MV, PACKED, Choice, KernelTable, Shape

CANDIDATES = kernels.available(torch.bfloat16)
SHAPE = Shape(48, 32, torch.bfloat16)
KEY = kernels.key(SHAPE)


def within_bf16_rounding(product: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> bool:
    """|product - exact| within one bf16 rounding of the output plus float32 reordering of the sum."""
    exact = x.double() @ weight.double().t()
    magnitude = x.double().abs() @ weight.double().abs().t()
    return bool(((product.double() - exact).abs() <= 2**-8 * exact.abs() + 2**-20 * magnitude).all())


@pytest.mark.parametrize("kernel", CANDIDATES)
@pytest.mark.parametrize("shape", [(2051, 1024), (3072, 256), (40, 8192)])
def test_every_candidate_computes_the_product_within_bf16_rounding(kernel, shape):
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(shape, generator=generator) / shape[1] ** 0.5).to(torch.bfloat16)
    x = torch.randn(1, 1, shape[1], generator=generator).to(torch.bfloat16)
    if kernel == PACKED:
        product = kernels.packed_product(x, kernels.pack(weight))
    else:
        product = kernels.plain_product(kernel, x, weight)
    assert product.shape == (1, 1, shape[0]) and product.dtype == torch.bfloat16
    assert within_bf16_rounding(product, weight, x)
    # The packed kernel takes any number of rows, as the engine's batches and prompts need.
    if kernel == PACKED:
        rows = torch.randn(3, 5, shape[1], generator=generator).to(torch.bfloat16)
        assert within_bf16_rounding(kernels.packed_product(rows, kernels.pack(weight)), weight, rows)


def test_a_measurement_times_every_candidate_available_here():
    speeds = kernels.measure(SHAPE)
    assert set(speeds) == set(CANDIDATES)
    assert all(0 < speed < float("inf") for speed in speeds.values())


def fixed_speeds(**gbps):
    """A measurement that records the shapes it is asked for and returns `gbps` for each
    (names with - spelled _)."""
    calls = []

    def measure(shapes):
        calls.extend(shapes)
        return {shape: {name.replace("_", "-"): speed for name, speed in gbps.items()} for shape in shapes}

    measure.calls = calls
    return measure


def test_shapes_missing_from_the_cache_are_measured_together(tmp_path):
    path = tmp_path / "kernels.json"
    KernelTable(path, measure=fixed_speeds(mv=1.0, linear=2.0)).choice(SHAPE)
    other = Shape(64, 32, torch.bfloat16)
    table = KernelTable(path, measure=fixed_speeds(mv=3.0, linear=2.0))
    choices = table.choices([SHAPE, other, other])
    assert table._measure.calls == [other]  # SHAPE came from the file
    assert choices == {SHAPE: Choice(LINEAR, {MV: 1.0, LINEAR: 2.0}), other: Choice(MV, {MV: 3.0, LINEAR: 2.0})}
    assert len(json.loads(path.read_text())["entries"]) == 2


def test_measuring_many_shapes_times_each_one():
    small = Shape(16, 32, torch.bfloat16)
    speeds = kernels.measure_many([SHAPE, small, SHAPE], (MV, LINEAR))
    assert list(speeds) == [SHAPE, small]
    assert all(set(each) == {MV, LINEAR} and min(each.values()) > 0 for each in speeds.values())


def test_the_choice_comes_from_the_cache_file_without_measuring(tmp_path):
    path = tmp_path / "kernels.json"
    # Saved by an earlier process: `linear` was the fastest then.
    first = KernelTable(path, measure=fixed_speeds(mv=10.0, linear=20.0))
    assert first.choice(SHAPE) == Choice(LINEAR, {MV: 10.0, LINEAR: 20.0})
    # A later process finds it, whatever a measurement would say now, and so does the next.
    for _ in range(2):
        later = KernelTable(path, measure=fixed_speeds(mv=30.0, linear=1.0))
        assert later.choice(SHAPE).kernel == LINEAR
        assert later._measure.calls == []
    stored = json.loads(path.read_text())
    assert stored["entries"][kernels.key(SHAPE)]["kernel"] == LINEAR
    # Measured once per shape and process, then held in memory.
    assert len(first._measure.calls) == 1
    first.choice(SHAPE)
    assert len(first._measure.calls) == 1


@pytest.mark.parametrize(
    "contents",
    [
        "{not json",
        "",
        json.dumps({"version": 0, "entries": {}}),
        json.dumps([1, 2]),
        json.dumps({"version": kernels.CACHE_VERSION, "entries": {KEY: {"kernel": "bogus", "gbps": {}}}}),
        json.dumps({"version": kernels.CACHE_VERSION, "entries": {KEY: {"kernel": MV, "gbps": "fast"}}}),
        json.dumps({"version": kernels.CACHE_VERSION, "entries": {KEY: "mv"}}),
    ],
    ids=["corrupt", "empty", "old version", "not a mapping", "unknown kernel", "bad speeds", "bad entry"],
)
def test_a_stale_or_corrupt_cache_is_ignored_and_rewritten(tmp_path, contents):
    path = tmp_path / "kernels.json"
    path.write_text(contents)
    table = KernelTable(path, measure=fixed_speeds(mv=5.0, linear=2.0))
    assert table.choice(SHAPE).kernel == MV
    assert table._measure.calls == [SHAPE]
    stored = json.loads(path.read_text())
    assert stored["version"] == kernels.CACHE_VERSION
    assert stored["entries"][kernels.key(SHAPE)] == {"kernel": MV, "gbps": {MV: 5.0, LINEAR: 2.0}}


def test_entries_of_other_machines_and_shapes_are_kept(tmp_path):
    path = tmp_path / "kernels.json"
    other = {"kernel": LINEAR, "gbps": {LINEAR: 1.0}}
    path.write_text(json.dumps({"version": kernels.CACHE_VERSION, "entries": {"another CPU | ...": other}}))
    KernelTable(path, measure=fixed_speeds(mv=5.0)).choice(SHAPE)
    entries = json.loads(path.read_text())["entries"]
    assert entries["another CPU | ..."] == other and kernels.key(SHAPE) in entries


def test_the_key_names_the_cpu_model_torch_threads_dtype_and_shape():
    key = kernels.key(Shape(2051, 1024, torch.bfloat16))
    assert kernels.cpu_name() in key and torch.__version__ in key
    assert f"{torch.get_num_threads()} threads" in key and "bfloat16 | 2051x1024" in key


def test_policies_off_and_forced_measure_nothing(tmp_path):
    never = fixed_speeds()
    assert KernelTable(tmp_path / "a.json", policy="off", measure=never).choice(SHAPE) == Choice(MV)
    assert KernelTable(tmp_path / "a.json", policy="LINEAR", measure=never).choice(SHAPE) == Choice(LINEAR)
    assert never.calls == [] and not (tmp_path / "a.json").exists()
    with pytest.raises(ValueError, match="CSM_KERNELS='fastest': use measure, off or one of"):
        KernelTable(tmp_path / "a.json", policy="fastest")


def test_a_kernel_within_noise_of_the_fastest_is_a_tie_that_the_simplest_wins():
    assert kernels.fastest({MV: 10.0, LINEAR: 10.4, PACKED: 10.2}) == MV
    assert kernels.fastest({MV: 9.0, LINEAR: 10.0, PACKED: 10.4}) == LINEAR
    assert kernels.fastest({MV: 9.0, LINEAR: 9.5, PACKED: 10.4}) == PACKED
    assert kernels.fastest({LINEAR: 3.0, PACKED: 2.0}) == LINEAR


def test_a_packed_choice_still_names_the_fastest_plain_kernel():
    """The heads are slices of one tensor, which cannot be packed: they take the best plain kernel."""
    assert Choice(PACKED, {MV: 3.0, LINEAR: 4.0, PACKED: 5.0}).plain == LINEAR
    assert Choice(PACKED).plain == MV and Choice(LINEAR).plain == LINEAR


def test_the_default_table_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CSM_KERNEL_CACHE", str(tmp_path / "k.json"))
    monkeypatch.setenv("CSM_KERNELS", "off")
    table = kernels.default_table()
    assert table.path == tmp_path / "k.json" and table.policy == "off"
    assert kernels.default_table() is table
    monkeypatch.setenv("CSM_KERNELS", "linear")
    assert kernels.default_table().policy == "linear"


def test_the_cache_lives_in_the_user_cache_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("CSM_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernels.cache_path() == tmp_path / "csm" / "kernels.json"



def test_onednn_off_is_set_once_at_import_and_keys_the_measurements():
    """CSM_ONEDNN=off: the process-wide switch, set when csm is imported, never around a call;
    `mv` is then PyTorch's portable kernel and nothing can be packed."""
    script = (
        "import torch, csm.kernels as k; "
        "print(torch.backends.mkldnn.enabled, k.available(torch.bfloat16), 'onednn off' in k.machine())"
    )
    for value, expected in (("off", "False ('mv', 'linear') True"), ("on", "True")):
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
            env={**os.environ, "CSM_ONEDNN": value},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(expected)
