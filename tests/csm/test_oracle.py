"""Our CSM against transformers' CsmForConditionalGeneration on the same random weights."""

import pytest
import torch

from csm.loading import load_for_generation
from tests.factories.csm import random_state_dict, tiny_config, transformers_model, write_csm_checkpoint

NUM_CODEBOOKS = 32
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def oracle(config):
    return transformers_model(config, random_state_dict(config, seed=0))


@pytest.fixture(scope="module", params=["original", "transformers"])
def ours(request, config, tmp_path_factory):
    folder = write_csm_checkpoint(tmp_path_factory.mktemp(request.param), config, layout=request.param, seed=0)
    model = load_for_generation(folder)
    model.setup_caches(1)
    return model


def prompt(config):
    """A context segment (text, 4 audio frames, the all-zero EOS frame) then the next text."""
    generator = torch.Generator().manual_seed(1)
    segments = []
    for text_length, num_frames in ((7, 4), (5, 0)):
        text = torch.zeros(text_length, NUM_CODEBOOKS + 1, dtype=torch.long)
        text[:, -1] = torch.randint(config.text_vocab_size, (text_length,), generator=generator)
        text_mask = torch.zeros_like(text, dtype=torch.bool)
        text_mask[:, -1] = True
        segments.append((text, text_mask))
        if num_frames:
            audio = torch.zeros(num_frames + 1, NUM_CODEBOOKS + 1, dtype=torch.long)
            audio[:num_frames, :-1] = torch.randint(2048, (num_frames, NUM_CODEBOOKS), generator=generator)
            audio_mask = torch.zeros_like(audio, dtype=torch.bool)
            audio_mask[:, :-1] = True
            segments.append((audio, audio_mask))
    tokens = torch.cat([tokens for tokens, _ in segments]).unsqueeze(0)
    mask = torch.cat([mask for _, mask in segments]).unsqueeze(0)
    return tokens, mask


def oracle_embeddings(oracle, tokens, mask):
    text = oracle.embed_text_tokens(tokens[..., -1])
    audio = oracle.backbone_model.embed_tokens(tokens[..., :-1])
    return torch.where(mask[..., -1:], text, audio)


@torch.no_grad()
def test_backbone_codebook0_and_depth_logits_match(ours, oracle, config):
    tokens, mask = prompt(config)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    ours.reset_caches()
    hidden = ours.backbone_hidden(tokens, mask, positions)
    expected = oracle.backbone_model(inputs_embeds=oracle_embeddings(oracle, tokens, mask)).last_hidden_state
    torch.testing.assert_close(hidden, expected, **TOLERANCE)

    last = expected[:, -1]
    torch.testing.assert_close(ours.codebook0_head(last), oracle.lm_head(last), **TOLERANCE)

    codes = torch.randint(2048, (1, NUM_CODEBOOKS), generator=torch.Generator().manual_seed(2))
    depth_inputs = torch.cat([torch.zeros(1, 1, dtype=torch.long), codes[:, :-1]], dim=1)
    expected_depth = oracle.depth_decoder(input_ids=depth_inputs, backbone_last_hidden_state=last).logits
    assert expected_depth.shape == (1, NUM_CODEBOOKS - 1, config.audio_vocab_size)
    torch.testing.assert_close(ours.depth_logits(last, codes), expected_depth, **TOLERANCE)


@torch.no_grad()
def oracle_greedy_frames(oracle, tokens, mask, num_frames):
    """The reference generation loop driven through transformers' modules, greedy."""
    from transformers import DynamicCache

    cache = DynamicCache(config=oracle.config)
    embeddings = oracle_embeddings(oracle, tokens, mask)
    frames = []
    for _ in range(num_frames):
        last = oracle.backbone_model(inputs_embeds=embeddings, cache=cache, use_cache=True).last_hidden_state[:, -1]
        codes = oracle.lm_head(last).argmax(-1, keepdim=True)
        depth_cache = DynamicCache(config=oracle.depth_decoder.config)
        # Position 0 holds the backbone state (its input id is a placeholder), position 1 code 0.
        inputs, backbone_state = torch.cat([torch.zeros_like(codes), codes], dim=1), last
        for _ in range(1, NUM_CODEBOOKS):
            logits = oracle.depth_decoder(
                input_ids=inputs,
                backbone_last_hidden_state=backbone_state,
                cache=depth_cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            inputs, backbone_state = logits.argmax(-1, keepdim=True), None
            codes = torch.cat([codes, inputs], dim=1)
        frames.append(codes)
        embeddings = oracle.backbone_model.embed_tokens(codes.unsqueeze(1))
    return torch.cat(frames)


NUM_FRAMES = 30


@pytest.fixture(scope="module")
def oracle_frames(oracle, config):
    tokens, mask = prompt(config)
    return oracle_greedy_frames(oracle, tokens, mask, NUM_FRAMES)


def test_greedy_frames_match_for_30_frames(ours, oracle_frames, config):
    tokens, mask = prompt(config)

    ours.reset_caches()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    frames = []
    for _ in range(NUM_FRAMES):
        frame = ours.generate_frame(tokens, mask, positions, temperature=1.0, topk=1)
        frames.append(frame)
        tokens = torch.cat([frame, torch.zeros_like(frame[:, :1])], dim=1).unsqueeze(1)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[..., -1] = False
        positions = positions[:, -1:] + 1
    assert torch.equal(torch.cat(frames), oracle_frames)
