"""Play speech while it is generated: raw 16-bit PCM chunks to stdout, 80 ms at a time.

    python examples/stream.py "Hello from Sesame." | aplay -f S16_LE -r 24000 -c 1
    python examples/stream.py "Hello from Sesame." | ffplay -f s16le -ar 24000 -ac 1 -nodisp -

Streamed chunks carry no watermark (it is computed over a whole clip); the watermarked
whole is written to stream.wav at the end.
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
save_audio("stream.wav", generator.watermark(torch.cat(chunks)).cpu(), generator.sample_rate)
