"""The engine and the server on a CUDA GPU, compiled (CUDA graphs) and quantized: what
scripts/gpu-check runs with `-m gpu`. Skipped where there is no CUDA GPU."""

import pytest
import torch

from csm import Generator
from csm.engine import Engine, Request
from csm.loading import load_for_generation
from csm.text import load_tokenizer
from tests.server.conftest import start_server

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FRAME = 1920


@pytest.mark.parametrize("quantize, compile", [(None, True), ("int8", False), ("int4", True)])
def test_the_engine_runs_rows_together_on_cuda(assets, quantize, compile):
    """Rows admitted at different frames, each decoding through the compiled step; every request
    gets its frames of finite audio."""
    from csm.mimi import Mimi

    model = load_for_generation(assets.model, device="cuda", dtype=torch.bfloat16, quantize=quantize, compile=compile)
    mimi = Mimi.from_pretrained(assets.mimi, device="cuda")
    generator = Generator(model, mimi, load_tokenizer(model_source=assets.model))
    requests = [Request(f"Line number {i}.", i % 2, (), 320, seed=i) for i in range(3)]
    with Engine(generator, max_batch=2) as engine:
        handles = [engine.submit(request) for request in requests]
        audio = [torch.cat([chunk.cpu() for chunk in handle]) for handle in handles]
    for samples in audio:
        assert samples.numel() % FRAME == 0 and 0 < samples.numel() <= 4 * FRAME
        assert torch.isfinite(samples).all()
    if compile:
        assert set(model.compile_seconds) == {"backbone step", "depth step"}


def test_the_server_speaks_on_cuda(assets, tmp_path):
    server = start_server(assets, tmp_path / "server", "--device", "cuda", "--dtype", "bfloat16", "--compile")
    try:
        request = {"model": "csm-1b", "input": "Hi there.", "voice": "ash", "response_format": "pcm",
                   "max_audio_seconds": 0.32, "stream": False}  # fmt: skip
        for _ in range(2):  # the second one runs on graphs already captured
            status, _, body = server.call("POST", "/v1/audio/speech", request)
            assert status == 200 and 0 < len(body) <= 2 * 4 * FRAME
    finally:
        assert server.stop() == 0
