"""The reference's conversation example (run_csm.py) on csm: two voices, four turns, one file.

    python examples/conversation.py

Downloads sesame/csm-1b (gated: accept its terms on the hub and log in first), Mimi and the
watermark weights on first use; runs on CUDA, Apple MPS or the CPU.
"""

import torch

from csm import Segment, load_csm_1b
from csm.audio import save_audio
from csm.voices import load_voice

generator = load_csm_1b()
print(f"Using device: {generator.device}")

# The built-in voices: recordings from the model repo's prompts/ folder with their transcripts.
prompts = [load_voice("conversational_a", speaker=0), load_voice("conversational_b", speaker=1)]

conversation = [
    {"text": "Hey how are you doing?", "speaker_id": 0},
    {"text": "Pretty good, pretty good. How about you?", "speaker_id": 1},
    {"text": "I'm great! So happy to be speaking with you today.", "speaker_id": 0},
    {"text": "Me too! This is some cool stuff, isn't it?", "speaker_id": 1},
]

generated = []
for utterance in conversation:
    print(f"Generating: {utterance['text']}")
    audio = generator.generate(
        text=utterance["text"],
        speaker=utterance["speaker_id"],
        context=prompts + generated,
        max_audio_length_ms=10_000,
    )
    generated.append(Segment(text=utterance["text"], speaker=utterance["speaker_id"], audio=audio))

save_audio("full_conversation.wav", torch.cat([segment.audio for segment in generated]).cpu(), generator.sample_rate)
print("Successfully generated full_conversation.wav")
