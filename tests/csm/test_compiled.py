"""compile=True: the frame step through torch.compile gives the eager model's tokens; CUDA paths on CUDA."""

import pytest
import torch

from csm import kernels
from csm.compiled import outliving_replays
from csm.loading import load_for_generation
from tests.csm.test_inference import frames
from tests.csm.test_model import text_prompt
from tests.factories.csm import tiny_config, write_csm_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_csm_checkpoint(tmp_path_factory.mktemp("csm"), tiny_config(), seed=7)


def test_the_compiled_step_gives_the_eager_tokens_and_reports_its_compile_time(folder):
    """float32, where inductor's fusions change no rounding that decides a token on this model."""
    eager = load_for_generation(folder)
    compiled = load_for_generation(folder, compile=True)
    prompt = [text_prompt(5, seed=0)]
    assert torch.equal(frames(compiled, prompt), frames(eager, prompt))
    assert set(compiled.compile_seconds) == {"backbone step x1", "depth step x1 (2 in)", "depth step x1 (1 in)"}
    assert all(seconds > 0 for seconds in compiled.compile_seconds.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_cuda_runs_the_compiled_step_in_every_mode(folder, quantize):
    """A prompt (eager), then one-position steps through the compiled CUDA graphs, a prompt chunk
    of one position in the other row (eager) among them; every backbone state held across later
    replays stays intact."""
    model = load_for_generation(folder, device="cuda", dtype=torch.bfloat16, quantize=quantize, compile=True)
    model.setup_caches(2)
    tokens, mask = text_prompt(5, seed=0)
    tokens, mask = tokens[None].cuda(), mask[None].cuda()
    held, copies, frames_made = [], [], []
    with torch.inference_mode():
        frame = model.generate_frame(tokens, mask, torch.arange(5, device="cuda")[None], temperature=0.9, topk=50)
        for step in range(4):
            audio = torch.cat([frame, frame.new_zeros(1, 1)], dim=1)[:, None]
            audio_mask = torch.ones_like(audio, dtype=torch.bool)
            audio_mask[..., -1] = False
            hidden = model.backbone_hidden(audio, audio_mask, torch.tensor([[5 + step]], device="cuda"), slice(0, 1))
            # A one-position prompt chunk in the other row, between two steps of this one.
            first = torch.zeros(1, 1, dtype=torch.long, device="cuda")
            model.backbone_hidden(tokens[:, :1], mask[:, :1], first, slice(1, 2))
            held.append(hidden)
            copies.append(hidden.clone())
            frame = model.sample_frame(hidden[:, -1], 0.9, 50, rows=slice(0, 1))
            frames_made.append(frame)
    torch.cuda.synchronize()
    assert set(model.compile_seconds) == {"backbone step x1", "depth step x1 (2 in)", "depth step x1 (1 in)"}
    assert all(torch.equal(kept, copy) for kept, copy in zip(held, copies))
    codes = torch.cat(frames_made)
    assert codes.shape == (4, 32) and ((codes >= 0) & (codes < 2051)).all()


def test_a_held_output_outlives_later_replays_of_a_cuda_graph():
    """Stands in for a CUDA graph: the step writes every output into one buffer of its own."""
    buffer = torch.zeros(3)

    def graph_replay(value):
        buffer.fill_(value)
        return buffer

    step = outliving_replays(graph_replay, cuda_graphs=True)
    first = step(1.0)
    step(2.0)
    assert torch.equal(first, torch.ones(3))
    # Without CUDA graphs the output is the caller's already: no copy.
    assert outliving_replays(graph_replay, cuda_graphs=False)(4.0) is buffer


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


@pytest.mark.skipif(kernels.PACKED not in kernels.available(torch.bfloat16), reason="oneDNN cannot pack bf16 here")
def test_a_compiled_packed_linear_runs_the_packed_kernel_outside_the_graph():
    """A packed weight is an opaque oneDNN tensor that the compiler cannot trace: the graph calls
    `csm::packed_linear` with the module's key, and gets the eager product bit for bit."""
    from csm.llama import Linear

    generator = torch.Generator().manual_seed(1)
    module = Linear(384, 512)
    weight = torch.randn(512, 384, generator=generator).to(torch.bfloat16)
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    module.use_kernel(kernels.PACKED)
    assert module.weight.is_mkldnn
    x = torch.randn(1, 1, 384, generator=generator).to(torch.bfloat16)
    compiled = torch.compile(module, dynamic=False)
    assert torch.equal(compiled(x), module(x))
    graph = torch._dynamo.explain(module)(x).graphs[0]
    assert "csm.packed_linear" in str(graph.code)
