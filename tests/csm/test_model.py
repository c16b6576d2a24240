import pytest
import torch

from csm.sampling import sample_topk
from tests.factories.csm import random_model, tiny_config

FRAME_SLOTS = 33


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=5)


def text_prompt(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.zeros(length, FRAME_SLOTS, dtype=torch.long)
    tokens[:, -1] = torch.randint(500, (length,), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -1] = True
    return tokens, mask


def next_input(frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.cat([frame, torch.zeros_like(frame[:, :1])], dim=1).unsqueeze(1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[..., -1] = False
    return tokens, mask


def generate(model, tokens, mask, positions, num_frames, **sampling):
    frames = []
    for _ in range(num_frames):
        frame = model.generate_frame(tokens, mask, positions, **sampling)
        frames.append(frame)
        tokens, mask = next_input(frame)
        positions = positions.max(dim=1, keepdim=True).values + 1
    return torch.stack(frames, dim=1)


def test_rows_of_different_lengths_decode_as_if_alone(model):
    """A shorter prompt is left-padded with positions it has not reached yet: those slots are
    masked from its real positions and overwritten before they are read."""
    greedy = {"temperature": 1.0, "topk": 1}
    prompts = [text_prompt(7, seed=0), text_prompt(4, seed=1)]
    alone = []
    for tokens, mask in prompts:
        model.setup_caches(1)
        positions = torch.arange(len(tokens)).unsqueeze(0)
        alone.append(generate(model, tokens[None], mask[None], positions, 3, **greedy))

    (long_tokens, long_mask), (short_tokens, short_mask) = prompts
    padding = len(long_tokens) - len(short_tokens)
    tokens = torch.stack([long_tokens, torch.cat([short_tokens[:padding], short_tokens])])
    mask = torch.stack([long_mask, torch.cat([torch.zeros_like(short_mask[:padding]), short_mask])])
    short_positions = torch.cat([torch.arange(len(short_tokens), len(long_tokens)), torch.arange(len(short_tokens))])
    positions = torch.stack([torch.arange(len(long_tokens)), short_positions])
    model.setup_caches(2)
    frames = []
    for _ in range(3):
        frame = model.generate_frame(tokens, mask, positions, **greedy)
        frames.append(frame)
        tokens, mask = next_input(frame)
        positions = positions[:, -1:] + 1
    batched = torch.stack(frames, dim=1)
    assert torch.equal(batched[0], alone[0][0])
    assert torch.equal(batched[1], alone[1][0])


def test_a_seed_reproduces_a_sampled_frame(model):
    tokens, mask = text_prompt(5, seed=2)
    positions = torch.arange(5).unsqueeze(0)
    runs = []
    for seed in (11, 11, 12):
        model.setup_caches(1)
        generator = torch.Generator().manual_seed(seed)
        runs.append(
            generate(model, tokens[None], mask[None], positions, 2, temperature=0.9, topk=50, generator=generator)
        )
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert runs[0].dtype == torch.long and runs[0].shape == (1, 2, 32)
    assert ((runs[0] >= 0) & (runs[0] < 2051)).all()


def test_the_model_asks_for_caches_of_the_right_batch(model):
    tokens, mask = text_prompt(3, seed=3)
    model.setup_caches(2)
    batch = (tokens[None].expand(3, -1, -1), mask[None].expand(3, -1, -1), torch.arange(3).expand(3, -1))
    with pytest.raises(ValueError, match="a batch of 3 needs 3 contiguous cache rows within the 2"):
        model.generate_frame(*batch, temperature=1.0, topk=1)
    with pytest.raises(ValueError, match="contiguous cache rows"):
        model.generate_frame(tokens[None], mask[None], torch.arange(3)[None], temperature=1.0, topk=1, rows=slice(1, 3))
    fresh = random_model(tiny_config(), seed=5)
    with pytest.raises(ValueError, match="setup_caches"):
        fresh.generate_frame(tokens[None], mask[None], torch.arange(3)[None], temperature=1.0, topk=1)


def test_sampling_follows_the_reference_operations():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    temperature, topk = 0.7, 5
    scaled = logits / temperature
    kept = scaled.masked_fill(scaled < torch.topk(scaled, topk)[0][..., -1, None], -float("inf"))
    probs = torch.softmax(torch.log_softmax(kept, dim=-1), dim=-1)
    noise = torch.empty_like(probs).exponential_(1, generator=torch.Generator().manual_seed(9))
    expected = torch.argmax(probs / noise, dim=-1, keepdim=True)
    sampled = sample_topk(logits, topk, temperature, torch.Generator().manual_seed(9))
    assert sampled.shape == (3, 1) and sampled.dtype == torch.long
    assert torch.equal(sampled, expected)


def test_a_row_range_of_the_caches_decodes_as_its_own_batch(model):
    """An engine keeps N rows of caches and steps any contiguous range of them: a sequence
    prefilled into row 2 while rows 0-1 hold others gives the frames it gives alone."""
    sampling = {"temperature": 0.9, "topk": 50}
    tokens, mask = text_prompt(6, seed=6)
    positions = torch.arange(6)[None]
    model.setup_caches(1)
    alone = generate(
        model, tokens[None], mask[None], positions, 3, generator=torch.Generator().manual_seed(3), **sampling
    )

    model.setup_caches(4)
    other_tokens, other_mask = text_prompt(4, seed=7)
    model.generate_frame(
        other_tokens[None].expand(2, -1, -1),
        other_mask[None].expand(2, -1, -1),
        torch.arange(4).expand(2, -1),
        **sampling,
    )
    rng = torch.Generator().manual_seed(3)
    frames, step_tokens, step_mask = [], tokens[None], mask[None]
    for _ in range(3):
        frame = model.generate_frame(step_tokens, step_mask, positions, generator=rng, rows=slice(2, 3), **sampling)
        frames.append(frame)
        step_tokens, step_mask = next_input(frame)
        positions = positions[:, -1:] + 1
    assert torch.equal(torch.stack(frames, dim=1), alone)


def test_per_row_sampling_gives_each_row_its_token_alone():
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(4))
    topks, temperatures, seeds = [1, 50, 50], [0.9, 0.9, 0.5], [None, 3, 4]

    def generators():
        return [None if seed is None else torch.Generator().manual_seed(seed) for seed in seeds]

    alone = [sample_topk(logits[i : i + 1], topks[i], temperatures[i], generators()[i]) for i in range(3)]
    assert torch.equal(sample_topk(logits, topks, temperatures, generators()), torch.cat(alone))
    same = [sample_topk(logits[i : i + 1], 50, 0.9, generators()[i]) for i in range(1, 3)]
    assert torch.equal(sample_topk(logits[1:], 50, 0.9, generators()[1:]), torch.cat(same))
    with pytest.raises(ValueError, match="one entry per row"):
        sample_topk(logits, [1, 2], 0.9)


def test_a_cache_free_forward_attends_causally(model):
    """Training runs the backbone without caches: each position sees itself and earlier ones,
    exactly as the cached step computes it."""
    tokens, mask = text_prompt(5, seed=8)
    positions = torch.arange(5)[None]
    model.setup_caches(1)
    cached = model.backbone_hidden(tokens[None], mask[None], positions)
    embeddings = model.embed(tokens[None], mask[None])
    layers = [layer.attn.cache for layer in model.backbone.layers]
    for layer in model.backbone.layers:
        layer.attn.cache = None
    try:
        free = model.backbone(embeddings, positions)
    finally:
        for layer, cache in zip(model.backbone.layers, layers):
            layer.attn.cache = cache
    torch.testing.assert_close(free, cached, atol=1e-5, rtol=1e-5)


def test_sampling_stays_within_the_top_k():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(1))
    allowed = set(torch.topk(logits, 3).indices[0].tolist())
    generator = torch.Generator().manual_seed(2)
    drawn = {sample_topk(logits, 3, 1.0, generator).item() for _ in range(200)}
    assert drawn == allowed


def test_bf16_generation_leaves_the_global_kernel_choice_alone():
    model = random_model(tiny_config(), seed=5).to(torch.bfloat16)
    model.setup_caches(1)
    tokens, mask = text_prompt(3, seed=4)
    enabled = torch.backends.mkldnn.enabled
    frames = generate(model, tokens[None], mask[None], torch.arange(3)[None], 2, temperature=1.0, topk=1)
    assert torch.backends.mkldnn.enabled == enabled
    assert frames.shape == (1, 2, 32) and ((frames >= 0) & (frames < 2051)).all()


def test_attention_over_the_leading_cache_blocks_equals_the_whole_cache_bit_for_bit():
    """`Llama.forward` on the CPU attends over whole 512-slot blocks up to the furthest position:
    the flash kernel then reduces in the same blocks, so bf16 results equal the whole cache's."""
    from csm.llama import _ATTENTION_BLOCK

    generator = torch.Generator().manual_seed(0)
    slots, used = 4 * _ATTENTION_BLOCK, 40
    q = torch.randn(2, 2, 8, 64, generator=generator).to(torch.bfloat16)
    k, v = (torch.randn(2, 2, slots, 64, generator=generator).to(torch.bfloat16) for _ in range(2))
    mask = (torch.arange(slots) < used).expand(2, 1, 8, slots)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    cut = _ATTENTION_BLOCK
    leading = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, :cut], v[:, :, :cut], attn_mask=mask[..., :cut]
    )
    assert torch.equal(leading, whole)
