"""The inference form (`csm.inference.prepare`): fused products give the plain model's tokens bit
for bit; quantized linears keep every row independent of the others."""

import pytest
import torch

from csm import kernels
from csm.inference import FusedLinear, prepare
from csm.loading import load_csm, load_for_generation
from csm.quantize import QuantizedLinear
from tests.csm.test_model import generate, next_input, text_prompt
from tests.factories.csm import tiny_config, write_csm_checkpoint

SAMPLING = {"temperature": 0.9, "topk": 50}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_csm_checkpoint(tmp_path_factory.mktemp("csm"), tiny_config(), seed=4)


def frames(model, prompts, num_frames=2, seed=0):
    """Sampled frames of a batch of prompts (same length), each row with its own generator."""
    tokens = torch.stack([tokens for tokens, _ in prompts])
    mask = torch.stack([mask for _, mask in prompts])
    model.setup_caches(len(prompts))
    positions = torch.arange(tokens.shape[1]).expand(len(prompts), -1)
    generators = [torch.Generator().manual_seed(seed + row) for row in range(len(prompts))]
    return generate(model, tokens, mask, positions, num_frames, generator=generators, **SAMPLING)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_products_give_the_plain_models_tokens(folder, dtype, monkeypatch):
    """One row (mat-vec kernel, the fused product) and several rows with a prompt longer than
    the multi-row kernels' blocking (each part on its own rows of the fused weight). In bf16
    with the kernels of the plain model (`torch.mv`): a kernel chosen for speed may round
    differently, which `test_every_kernel_keeps_bf16_within_its_rounding_of_float32` bounds."""
    monkeypatch.setenv("CSM_KERNELS", "off")
    plain = load_csm(folder, dtype=dtype)
    fast = load_for_generation(folder, dtype=dtype)
    assert isinstance(fast.backbone.layers[0].attn.qkv_proj, FusedLinear)
    assert not hasattr(fast.decoder.layers[0].mlp, "w1")
    prompts = [text_prompt(40, seed=0), text_prompt(40, seed=1)]
    assert torch.equal(frames(fast, prompts[:1]), frames(plain, prompts[:1]))
    assert torch.equal(frames(fast, prompts), frames(plain, prompts))


def stepped_logits(model, prompt, codes):
    """Logits of every codebook of one frame, teacher-forced on codes [32], through the
    one-row products of generation (the backbone's step, its head, 31 depth-decoder steps)."""
    tokens, mask = prompt
    model.setup_caches(1)
    hidden = model.backbone_hidden(tokens[None], mask[None], torch.arange(tokens.shape[0])[None])[:, -1]
    logits = [model.codebook0_head(hidden)]
    inputs = torch.cat([hidden[:, None], model.audio_embeddings(codes[None, :1])], dim=1)
    for k in range(1, 32):
        positions = model.depth_positions[:, :2] if k == 1 else model.depth_positions[:, k : k + 1]
        logits.append(model.depth_step(inputs, positions, slice(0, 1), model.audio_head[k - 1]))
        inputs = model.audio_embeddings(codes[None, k : k + 1] + model.codebook_offsets[k])
    return torch.cat(logits).float()


@pytest.mark.parametrize("kernel", ["measure", *kernels.available(torch.bfloat16)])
def test_every_kernel_keeps_bf16_within_its_rounding_of_float32(folder, kernel, monkeypatch):
    """bf16 with the kernels chosen here (or each one forced) errs from float32 no more than
    bf16 with csm 0.2's `torch.mv` does, up to rounding noise: the choice is one of speed only."""
    codes = torch.randint(2048, (32,), generator=torch.Generator().manual_seed(0))
    prompt = text_prompt(7, seed=5)
    with torch.inference_mode():
        exact = stepped_logits(load_for_generation(folder), prompt, codes)
        monkeypatch.setenv("CSM_KERNELS", "off")
        reference = stepped_logits(load_for_generation(folder, dtype=torch.bfloat16), prompt, codes)
        monkeypatch.setenv("CSM_KERNELS", kernel)
        model = load_for_generation(folder, dtype=torch.bfloat16)
        chosen = stepped_logits(model, prompt, codes)
    if kernel != "measure":
        assert model.backbone.layers[0].mlp.w2.kernel == kernel
    bf16_error = (reference - exact).abs().max()
    assert 0 < bf16_error < 0.05 * exact.abs().max()
    assert (chosen - exact).abs().max() <= 1.5 * bf16_error


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_rows_decode_as_if_alone(folder, quantize):
    """The batching engine steps any range of rows: a quantized model gives a row the frames
    it gives that row alone."""
    model = load_for_generation(folder, quantize=quantize)
    layer = model.decoder.layers[1]
    assert isinstance(layer.mlp.w2, QuantizedLinear) and layer.mlp.w2.packed
    assert isinstance(layer.attn.qkv_proj.linear, QuantizedLinear)
    prompts = [text_prompt(6, seed=2), text_prompt(6, seed=3)]
    alone = [frames(model, [prompt], seed=row) for row, prompt in enumerate(prompts)]
    together = frames(model, prompts)
    assert torch.equal(together, torch.cat(alone))
    assert ((together >= 0) & (together < 2051)).all()

    model.setup_caches(3)
    tokens, mask = prompts[1][0][None], prompts[1][1][None]
    positions, rng, stepped = torch.arange(6)[None], torch.Generator().manual_seed(1), []
    for _ in range(2):
        frame = model.generate_frame(tokens, mask, positions, generator=rng, rows=slice(2, 3), **SAMPLING)
        stepped.append(frame)
        tokens, mask = next_input(frame)
        positions = positions[:, -1:] + 1
    assert torch.equal(torch.stack(stepped, dim=1), alone[1])


def test_quantized_models_stay_close_to_bf16(folder):
    """Teacher-forced depth logits: int8 within a few percent of bf16, int4 within ~15%."""
    codes = torch.randint(2048, (1, 32), generator=torch.Generator().manual_seed(0))
    tokens, mask = text_prompt(5, seed=4)
    logits = {}
    for quantize in (None, "int8", "int4"):
        model = load_for_generation(folder, dtype=torch.bfloat16, quantize=quantize)
        model.setup_caches(1)
        hidden = model.backbone_hidden(tokens[None], mask[None], torch.arange(5)[None])[:, -1]
        logits[quantize] = model.depth_logits(hidden, codes).float()
    scale = logits[None].std()
    assert (logits["int8"] - logits[None]).std() < 0.05 * scale
    assert (logits["int4"] - logits[None]).std() < 0.2 * scale


def test_quantize_asks_for_a_known_format_in_bfloat16(folder):
    with pytest.raises(ValueError, match="unknown quantize='int3'"):
        load_for_generation(folder, quantize="int3")
    with pytest.raises(ValueError, match="runs in bfloat16, not float32"):
        load_for_generation(folder, quantize="int8", dtype=torch.float32)
    with pytest.raises(ValueError, match="quantized models run in bfloat16"):
        prepare(load_csm(folder), "int8")
