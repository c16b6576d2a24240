"""compile=True: the frame step through torch.compile gives the eager model's tokens; CUDA paths on CUDA."""

import pytest
import torch

from csm.model import CSM
from tests.csm.test_inference import frames
from tests.csm.test_model import text_prompt
from tests.factories.csm import tiny_config, write_csm_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_csm_checkpoint(tmp_path_factory.mktemp("csm"), tiny_config(), seed=7)


def test_the_compiled_step_gives_the_eager_tokens_and_reports_its_compile_time(folder):
    """float32, where inductor's fusions change no rounding that decides a token on this model."""
    eager = CSM.from_pretrained(folder)
    compiled = CSM.from_pretrained(folder, compile=True)
    prompt = [text_prompt(5, seed=0)]
    assert torch.equal(frames(compiled, prompt), frames(eager, prompt))
    assert set(compiled.compile_seconds) == {"backbone step", "depth step"}
    assert all(seconds > 0 for seconds in compiled.compile_seconds.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_cuda_generates_in_every_mode(folder, quantize):
    """Quantized linears are dequantized on CUDA; the compiled step runs as CUDA graphs."""
    model = CSM.from_pretrained(folder, device="cuda", dtype=torch.bfloat16, quantize=quantize, compile=True)
    model.setup_caches(1)
    tokens, mask = text_prompt(5, seed=0)
    frame = model.generate_frame(
        tokens[None].cuda(), mask[None].cuda(), torch.arange(5, device="cuda")[None], temperature=0.9, topk=50
    )
    assert frame.shape == (1, 32) and ((frame >= 0) & (frame < 2051)).all()


def test_a_compiled_bf16_row_product_runs_the_eager_mat_vec_kernel():
    """Inductor would lower torch.mv to a general product (oneDNN's, half the speed for one row,
    and rounded differently); `csm::matrix_vector` keeps the eager kernel, bit for bit."""
    from csm.llama import linear

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 384, generator=generator).to(torch.bfloat16)
    x = torch.randn(1, 1, 384, generator=generator).to(torch.bfloat16)
    compiled = torch.compile(linear, dynamic=False)
    assert torch.equal(compiled(x, weight), linear(x, weight))
    graph = torch._dynamo.explain(linear)(x, weight).graphs[0]
    assert "csm.matrix_vector" in str(graph.code)
