"""Play speech while it is generated: raw 16-bit PCM to stdout, one watermarked 1.04 s clip at a time.

    python examples/stream.py "Hello from Sesame." | aplay -f S16_LE -r 24000 -c 1
    python examples/stream.py "Hello from Sesame." | ffplay -f s16le -ar 24000 -ac 1 -nodisp -

Each streamed clip is watermarked on its own (see csm.watermark.stream); the joined clips
are written to stream.wav at the end.
"""

import sys

import torch

from csm import load_csm_1b
from csm.audio import save_audio, write_pcm16

generator = load_csm_1b()
chunks = []
for chunk in generator.generate_stream(sys.argv[1], speaker=0, context=[], max_audio_length_ms=10_000):
    write_pcm16(sys.stdout.buffer, chunk.cpu())
    chunks.append(chunk)
save_audio("stream.wav", torch.cat(chunks).cpu(), generator.sample_rate)
