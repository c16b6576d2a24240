"""Our loss against transformers' CsmForConditionalGeneration on the same weights and conversation."""

import torch

from csm.finetune.batches import collate
from csm.finetune.loss import loss_terms
from csm.finetune.sequences import Example
from tests.factories.csm import random_model, random_state_dict, tiny_config, transformers_model

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# Weights whose gradients are compared: our name, transformers' name, q/k head count to permute.
GRADIENTS = [
    ("backbone.layers.0.attn.q_proj.weight", "backbone_model.layers.0.self_attn.q_proj.weight", 4),
    ("backbone.layers.1.mlp.w2.weight", "backbone_model.layers.1.mlp.down_proj.weight", None),
    ("decoder.layers.0.attn.k_proj.weight", "depth_decoder.model.layers.0.self_attn.k_proj.weight", 1),
    ("decoder.layers.1.mlp.w1.weight", "depth_decoder.model.layers.1.mlp.gate_proj.weight", None),
    ("codebook0_head.weight", "lm_head.weight", None),
    ("projection.weight", "depth_decoder.model.inputs_embeds_projector.weight", None),
    ("audio_head", "depth_decoder.codebooks_head.weight", None),
]


def conversation(config, generator, num_frames_trained):
    """Two segments (the first context only), each text then frames then the end-of-audio frame."""
    tokens, mask, trained, end = [], [], [], []
    for text_length, num_frames, train in ((5, 3, False), (6, num_frames_trained, True)):
        text = torch.zeros(text_length, 33, dtype=torch.long)
        text[:, -1] = torch.randint(config.text_vocab_size, (text_length,), generator=generator)
        audio = torch.zeros(num_frames + 1, 33, dtype=torch.long)
        audio[:num_frames, :-1] = torch.randint(2048, (num_frames, 32), generator=generator)
        tokens += [text, audio]
        mask += [text != 0, torch.ones_like(audio, dtype=torch.bool)]
        mask[-2][:, :-1], mask[-1][:, -1] = False, False
        mask[-2][:, -1] = True
        trained += [torch.zeros(text_length, dtype=torch.bool), torch.full((num_frames + 1,), train)]
        end_of_audio = torch.zeros(num_frames + 1, dtype=torch.bool)
        end_of_audio[-1] = train
        end += [torch.zeros(text_length, dtype=torch.bool), end_of_audio]
    return Example(torch.cat(tokens), torch.cat(mask), torch.cat(trained), torch.cat(end), "test")


def oracle_inputs(oracle, batch):
    text = oracle.embed_text_tokens(batch.tokens[..., -1])
    audio = oracle.backbone_model.embed_tokens(batch.tokens[..., :-1])
    embeddings = torch.where(batch.mask[..., -1:], text, audio)
    labels = torch.full(batch.tokens[..., :-1].shape, -100)
    rows, positions = batch.frames
    labels[rows, positions] = batch.tokens[rows, positions, :-1]
    return embeddings, labels


def _permuted(weight, heads):
    rows, dim = weight.shape
    return weight.view(heads, rows // heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def test_loss_and_gradients_equal_transformers():
    config = tiny_config()
    ours = random_model(config, seed=0).requires_grad_(True)
    oracle = transformers_model(config, random_state_dict(config, seed=0))
    generator = torch.Generator().manual_seed(1)
    # Two rows of different lengths: the shorter one is padded.
    examples = [conversation(config, generator, num_frames) for num_frames in (5, 2)]
    batch = collate(examples, ratio=1.0, generator=None)

    terms = loss_terms(ours, batch)
    backbone = terms.backbone_sum / terms.backbone_tokens
    decoder = terms.decoder_sum / terms.decoder_tokens
    (backbone + decoder).backward()

    embeddings, labels = oracle_inputs(oracle, batch)
    expected = oracle(inputs_embeds=embeddings, labels=labels)
    expected.loss.backward()
    torch.testing.assert_close(backbone, expected.backbone_loss, **TOLERANCE)
    torch.testing.assert_close(decoder, expected.depth_decoder_loss, **TOLERANCE)
    torch.testing.assert_close(backbone + decoder, expected.loss, **TOLERANCE)

    ours_parameters = dict(ours.named_parameters())
    oracle_parameters = dict(oracle.named_parameters())
    for name, oracle_name, heads in GRADIENTS:
        gradient = ours_parameters[name].grad
        expected_gradient = oracle_parameters[oracle_name].grad
        if heads is not None:
            gradient = _permuted(gradient, heads)
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(gradient, expected_gradient, **TOLERANCE)


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch():
    config = tiny_config()
    generator = torch.Generator().manual_seed(2)
    examples = [conversation(config, generator, num_frames) for num_frames in (6, 2)]

    def gradient(batches):
        model = random_model(config, seed=0).requires_grad_(True)
        terms = [loss_terms(model, batch) for batch in batches]
        backbone_tokens = sum(term.backbone_tokens for term in terms)
        decoder_tokens = sum(term.decoder_tokens for term in terms)
        for term in terms:
            term.loss(backbone_tokens, decoder_tokens, c0_weight=0.5, decoder_weight=2.0).backward()
        return model.backbone.layers[0].mlp.w1.weight.grad

    whole = gradient([collate(examples, ratio=1.0, generator=None)])
    accumulated = gradient([collate([example], ratio=1.0, generator=None) for example in examples])
    torch.testing.assert_close(accumulated, whole, **TOLERANCE)
