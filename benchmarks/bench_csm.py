"""CSM-1B on CPU: loading and generation speed, ours against transformers on the same weights.

    python benchmarks/bench_csm.py [--frames 8] [--threads N] [--workdir /tmp/csm-bench] [--compile]

Writes a full-size CSM-1B checkpoint with random weights in the original layout (fp32,
6.2 GB) once, and its int8 and int4 folders (`csm quantize`), then:
- loads each in a fresh process (fp32, bf16, and the quantized folders), reporting the load
  time, the resident size of the loaded model and the peak memory the load added;
- measures the floor of this machine in this run: the fastest bf16 matrix-vector product on
  a weight too large for the caches, times the bf16 weights a frame reads;
- times generation in seconds per frame (a short text prompt, then a fixed number of frames,
  end of speech not checked) for our CSM in fp32, bf16, int8 and int4 (and bf16 compiled
  with --compile) and for transformers' `CsmForConditionalGeneration.generate` in fp32
  holding the same weights.
Needs about 16 GB of free memory; transformers is the only extra package.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import csm.quantized_checkpoint  # noqa: F401 - imported up front so that its import is not counted as loading memory
from csm import kernels
from csm.loading import load_csm, load_for_generation
from csm.model import CSM, CSMConfig
from csm.quantized_checkpoint import save_quantized

PROMPT_LENGTH = 24
WARMUP_FRAMES = 1


def write_random_checkpoint(directory: Path, config: CSMConfig, seed: int = 0) -> Path:
    """model.safetensors + config.json with random fp32 weights, written tensor by tensor."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "model.safetensors"
    if weights.is_file():
        return directory
    with torch.device("meta"):
        shapes = {name: tuple(tensor.shape) for name, tensor in CSM(config).state_dict().items()}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    partial = weights.with_suffix(".partial")
    with partial.open("wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for name, shape in shapes.items():
            file.write(memoryview(_random_tensor(name, shape, generator).numpy()).cast("B"))
    partial.rename(weights)
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return directory


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator)
    if name.endswith(".scale"):
        return 1 + 0.1 * values
    if name.endswith("embeddings.weight"):
        return values
    fan_in = shape[-2] if name == "audio_head" else shape[-1]
    return values / fan_in**0.5


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    # Linux: the second field of statm is the resident set, in pages.
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def load_in_fresh_process(directory: Path, dtype: str, quantize: str) -> dict:
    """Load time and memory of `csm.loading.load_for_generation` in a process of its own."""
    output = subprocess.run(
        [sys.executable, __file__, "--measure-load", str(directory), dtype, quantize],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.splitlines()[-1])


def measure_load(directory: str, dtype: str, quantize: str) -> None:
    before = _current_rss_bytes()
    start = time.perf_counter()
    quantize = None if quantize == "none" else quantize
    model = load_for_generation(directory, dtype=getattr(torch, dtype), quantize=quantize)
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes() - before
    # Resident after loading and after 4 frames: mapped tables count only for the pages in use.
    loaded = _current_rss_bytes() - before
    ours_seconds_per_frame(model, frames=4)
    caches = sum(layer.attn.cache.k.nbytes * 2 for llama in (model.backbone, model.decoder) for layer in llama.layers)
    generating = _current_rss_bytes() - before - caches
    print(
        json.dumps(
            {
                "seconds": seconds,
                "model_bytes": resident_bytes(model),
                "added_rss_bytes": peak,
                "loaded_rss_bytes": loaded,
                "generating_rss_bytes": generating,
            }
        )
    )


def resident_bytes(model: CSM) -> int:
    """Bytes of the model's parameters and buffers (without KV caches: measured before setup_caches)."""
    tensors = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())


def bf16_bytes_per_frame(config: CSMConfig) -> int:
    """The bf16 weights one batch-1 frame reads: the backbone's linears and first head once,
    then per depth step the decoder's linears, the projection and one codebook's head."""
    backbone, decoder = config.backbone, config.decoder

    def layer_weights(llama) -> int:
        attention = llama.dim * (llama.num_heads + 2 * llama.num_kv_heads) * llama.head_dim
        attention += llama.num_heads * llama.head_dim * llama.dim
        return llama.num_layers * (attention + 3 * llama.dim * llama.ffn_dim)

    backbone_weights = layer_weights(backbone) + backbone.dim * config.audio_vocab_size
    step = layer_weights(decoder) + backbone.dim * decoder.dim + decoder.dim * config.audio_vocab_size
    return 2 * (backbone_weights + (config.audio_num_codebooks - 1) * step)


def matrix_vector_floor_seconds(bytes_per_frame: int, repeats: int = 20) -> tuple[float, str]:
    """The fastest bf16 matrix-vector kernel's time for a frame's bytes, and which kernel it was.

    Measured on 8192 x 8192 weights (128 MB each, cycled through 4 so none stays cached)."""
    weights = [torch.randn(8192, 8192).to(torch.bfloat16) for _ in range(4)]
    x = torch.randn(8192).to(torch.bfloat16)
    candidates = {
        "torch.mv": (weights, lambda w: torch.mv(w, x)),
        "F.linear (oneDNN)": (weights, lambda w: F.linear(x[None], w)),
    }
    if kernels.packed_available(torch.bfloat16):  # what csm.kernels may choose: the floor is the fastest
        packed = [kernels.pack(weight) for weight in weights]
        candidates["oneDNN packed"] = (packed, lambda w: kernels.packed_product(x[None], w))
    best = {}
    for name, (operands, kernel) in candidates.items():
        for weight in operands:
            kernel(weight)
        start = time.perf_counter()
        for step in range(repeats):
            kernel(operands[step % len(operands)])
        best[name] = (time.perf_counter() - start) / repeats
    name = min(best, key=best.get)
    bytes_per_second = weights[0].numel() * 2 / best[name]
    return bytes_per_frame / bytes_per_second, f"{name}, {bytes_per_second / 1e9:.1f} GB/s"


def text_prompt(config: CSMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(config.text_vocab_size, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(1))
    tokens = torch.zeros(1, PROMPT_LENGTH, config.audio_num_codebooks + 1, dtype=torch.long)
    tokens[..., -1] = ids
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[..., -1] = True
    return tokens, mask


@torch.inference_mode()
def ours_seconds_per_frame(model: CSM, frames: int) -> float:
    tokens, mask = text_prompt(model.config)
    model.setup_caches(1)
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(PROMPT_LENGTH).unsqueeze(0)
    frame = model.generate_frame(tokens, mask, positions, temperature=0.9, topk=50, generator=generator)
    audio_mask = torch.ones(1, 1, model.config.audio_num_codebooks + 1, dtype=torch.bool)
    audio_mask[..., -1] = False
    start = None
    for step in range(WARMUP_FRAMES + frames):
        if step == WARMUP_FRAMES:
            start = time.perf_counter()
        tokens = torch.cat([frame, torch.zeros_like(frame[:, :1])], dim=1).unsqueeze(1)
        positions = positions[:, -1:] + 1
        frame = model.generate_frame(tokens, audio_mask, positions, temperature=0.9, topk=50, generator=generator)
    return (time.perf_counter() - start) / frames


def transformers_model(model: CSM):
    """transformers' CSM sharing the fp32 weights of `model`, in the published layout (q/k rows
    permuted into its own)."""
    from transformers import CsmForConditionalGeneration
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.csm.modeling_csm import CsmBackboneModelEmbeddings, CsmRotaryEmbedding

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.factories.csm import to_transformers_layout, transformers_config

    with torch.device("meta"):
        oracle = CsmForConditionalGeneration(transformers_config(model.config))
    oracle.load_state_dict(to_transformers_layout(model.config, model.state_dict()), strict=False, assign=True)
    # Its codec (Mimi) stays empty: generating codes does not use it.
    missing = [name for name, p in oracle.named_parameters() if p.is_meta and not name.startswith("codec_model.")]
    if missing:
        raise ValueError(f"transformers' CSM got no weights for {missing[:3]}...: pass the published layout")
    # Buffers that are not in a state dict were built on the meta device: compute them.
    for module in oracle.modules():
        if isinstance(module, CsmRotaryEmbedding):
            module.inv_freq = ROPE_INIT_FUNCTIONS[module.rope_type](module.config)[0]
        elif isinstance(module, CsmBackboneModelEmbeddings):
            module.audio_tokens_offsets = torch.arange(model.config.audio_num_codebooks) * model.config.audio_vocab_size
    return oracle.eval()


@torch.inference_mode()
def transformers_seconds_per_frame(oracle, config: CSMConfig, frames: int) -> float:
    """transformers' own generation loop, greedy in both stages.

    Greedy because its sampler (`torch.multinomial`) refuses the non-finite probabilities that
    random weights can give; choosing a code is a negligible part of a frame either way.
    """
    input_ids = text_prompt(config)[0][..., -1]
    options = {"do_sample": False, "depth_decoder_do_sample": False}
    torch.manual_seed(0)
    # Random weights can give an all-zero frame, transformers' end of speech: with no code
    # equal to -1 it runs every frame, as ours does here.
    oracle.config.codebook_eos_token_id = -1
    oracle.generate(input_ids=input_ids, max_new_tokens=WARMUP_FRAMES, **options)
    start = time.perf_counter()
    codes = oracle.generate(input_ids=input_ids, max_new_tokens=frames, **options)
    if codes.shape[1] != frames:
        raise RuntimeError(f"transformers generated {codes.shape[1]} frames, not {frames}")
    return (time.perf_counter() - start) / frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=8, help="frames timed per configuration")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/csm-bench"), help="where the checkpoints go")
    parser.add_argument("--threads", type=int, help="torch threads for generation (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time bf16 with compile=True")
    parser.add_argument("--measure-load", nargs=3, metavar=("DIR", "DTYPE", "QUANTIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure_load:
        measure_load(*args.measure_load)
        return

    start = time.perf_counter()
    directory = write_random_checkpoint(args.workdir / "csm-1b-random", CSMConfig())
    quantized = {}
    for quantize in ("int8", "int4"):
        quantized[quantize] = args.workdir / f"csm-1b-random-{quantize}"
        if not (quantized[quantize] / "config.json").is_file():
            save_quantized(load_csm(directory, dtype=torch.bfloat16), quantized[quantize], quantize)
    print(f"random full-size checkpoints: {args.workdir} ({time.perf_counter() - start:.0f} s)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")

    print(
        "| load (fresh process) | seconds | tensors GB | peak RSS added GB | peak / tensors "
        "| resident GB, loaded | resident GB, after 4 frames (without KV caches) |"
    )
    print("|---|---|---|---|---|---|---|")
    loads = [
        ("float32", directory, "float32", "none"),
        ("bfloat16", directory, "bfloat16", "none"),
        ("int8 folder", quantized["int8"], "bfloat16", "none"),
        ("int4 folder", quantized["int4"], "bfloat16", "none"),
    ]
    for name, folder, dtype, quantize in loads:
        load = load_in_fresh_process(folder, dtype, quantize)
        ratio = load["added_rss_bytes"] / load["model_bytes"]
        print(
            f"| {name} | {load['seconds']:.1f} | {load['model_bytes'] / 1e9:.2f} | "
            f"{load['added_rss_bytes'] / 1e9:.2f} | {ratio:.2f} | {load['loaded_rss_bytes'] / 1e9:.2f} | "
            f"{load['generating_rss_bytes'] / 1e9:.2f} |"
        )

    floor, kernel = matrix_vector_floor_seconds(bf16_bytes_per_frame(CSMConfig()))
    rows = []
    model = load_for_generation(directory)
    rows.append(("csm fp32", ours_seconds_per_frame(model, args.frames)))
    del model
    oracle = transformers_model(load_csm(directory))
    rows.append(("transformers fp32", transformers_seconds_per_frame(oracle, CSMConfig(), args.frames)))
    del oracle
    # The published layout, as fine-tuning holds it: what the fused products gain.
    model = load_csm(directory, dtype=torch.bfloat16)
    rows.append(("csm bf16, unfused (load_csm)", ours_seconds_per_frame(model, args.frames)))
    del model
    modes = [("csm bf16", directory, {"dtype": torch.bfloat16})]
    if args.compile:
        modes.append(("csm bf16 compiled", directory, {"dtype": torch.bfloat16, "compile": True}))
    modes += [("csm int8", quantized["int8"], {}), ("csm int4", quantized["int4"], {})]
    for name, folder, options in modes:
        model = load_for_generation(folder, **options)
        rows.append((name, ours_seconds_per_frame(model, args.frames)))
        if options.get("compile"):
            compiled = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in model.compile_seconds.items())
            print(f"compile time (first frame): {compiled}")
        del model

    baseline = rows[1][1]
    print(
        f"\nbf16 floor in this run: {floor:.3f} s/frame ({kernel}, {bf16_bytes_per_frame(CSMConfig()) / 1e9:.2f} GB a frame)"
    )
    print(f"\n| generation, batch 1, {args.frames} frames | s/frame | vs transformers fp32 | vs bf16 floor |")
    print("|---|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {baseline / seconds:.2f}x | {seconds / floor:.2f}x |")


if __name__ == "__main__":
    main()
