"""A tiny Llama-3-format tokenizer.json, trained on the spot, for tests without the hub.

Same format as the real one: Llama-3's split regex, byte-level BPE without a prefix space,
`<|begin_of_text|>` / `<|end_of_text|>`, and a BOS-only template that csm must replace with
its BOS + EOS one. All ids are below `tests.factories.csm.TINY_TEXT_VOCAB`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
TINY_VOCAB_SIZE = 400
CORPUS = [
    "Hello there, how are you today?",
    "Hello, this is a test sentence.",
    "The past is just a story we tell ourselves.",
    "Speech models turn text into sound, one frame at a time.",
] * 20


def write_tiny_tokenizer(path: Path) -> Path:
    """Train the tiny tokenizer and save it as `path` (a tokenizer.json); returns the path."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path
