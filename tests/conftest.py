"""Settings for every test: the kernel cache of the session's own, and the `gpu` marker."""

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU (skipped without one); scripts/gpu-check runs these with -m gpu"
    )


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache(tmp_path_factory):
    """Kernel choices (`csm.kernels`) are measured into a file of this session's, never the user's
    cache; servers and CLIs started by tests inherit it."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("CSM_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels") / "kernels.json"))
    yield
    monkeypatch.undo()
