"""CSM-1B on CPU against ggml: ours against CrispASR's CSM backend, same random weights, batch 1.

    python benchmarks/bench_ggml.py --crispasr LIB --crispasr-quantize TOOL \\
        [--frames 16] [--threads 2] [--workdir /tmp/csm-bench]

The peer is CrispASR (github.com/CrispStrobe/CrispASR), whose `csm_tts` backend runs
Sesame's CSM on ggml. Nothing of it is part of this project: build it yourself and pass
- `--crispasr`: a shared library exposing its C API (`src/csm_tts.h`: `csm_tts_init_from_file`,
  `csm_tts_run_generate_codes`, ...), that is its `csm-tts` static library, its `crispasr-core`
  and ggml linked into one shared object;
- `--crispasr-quantize`: its `crispasr-quantize` tool (`input.gguf output.gguf q8_0|q4_k`).

What it does, in one run:
- writes (or reuses) the full-size random CSM-1B checkpoint of bench_csm.py in the published
  layout, and its int8 and int4 folders (`csm quantize`);
- converts the same weights to a GGUF file in the layout CrispASR's CSM loader reads (names and
  metadata below; 2-D and larger tensors in F16, vectors in F32, as its own converter writes
  them), with q/k rows in rotate-half order (its RoPE is ggml's NEOX mode), then re-quantizes
  that file to Q8_0 and Q4_K with its quantize tool;
- adds what its loader requires besides the two transformers: a tokenizer (dummy entries but
  for the single characters that spell this run's prompt, so that it sees the prompt tokens
  csm sees) and a Mimi decoder with random weights (as the other benches' Mimi; its time is
  taken out, below);
- times, each in a fresh process and with the same number of threads: csm bf16 (eager; as
  shipped, and with `CSM_ONEDNN=off`), int8 (weight-only), int8-dynamic (integer products) and
  int4 (`load_for_generation`), and CrispASR on the F16, Q8_0 and Q4_K files;
- prints the bf16 floor of this machine (bench_csm.py's) and one table with the targets.

What the numbers cover. csm: seconds per frame of `generate_frame` (one backbone step and the
31 depth steps, top-k 50 sampling), after a prompt of 24 text tokens and one untimed frame.
ggml: CrispASR's generation is one call (tokenize, prompt, frames, Mimi decode); its own stage
timer (CRISPASR_CSM_BENCH=1) gives the Mimi decode, which is subtracted, and two calls of
1 + 1 and 1 + 1 + N frames are subtracted from each other, which leaves N frames' backbone and
depth steps (greedy: the C API caps frames only in greedy mode; choosing a code is a negligible
part of a frame either way). Its per-call work (reading the embedding tables to fp32, the
prompt, the first frames) cancels out.

Needs the `gguf` package (PyPI), a dependency of this benchmark only, and about 16 GB of free
memory and 15 GB of disk in the work directory.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_csm import (
    PROMPT_LENGTH,
    WARMUP_FRAMES,
    bf16_bytes_per_frame,
    matrix_vector_floor_seconds,
    ours_seconds_per_frame,
    text_prompt,
    write_random_checkpoint,
)

from csm.loading import load_csm, load_for_generation
from csm.model import CSMConfig
from csm.quantized_checkpoint import save_quantized

# The pairs compared (csm's mode, the folder it loads, its environment; ggml's file), and the
# target ratio (ggml s/frame over csm s/frame) of each. Both int8 modes load the one int8
# folder; bf16 runs as it ships and with oneDNN off for the process (PyTorch's portable one-row
# kernel, the opt-in `CSM_ONEDNN=off`).
PAIRS = [
    ("bf16", "bf16", {}, "F16", 1.1),
    ("bf16", "bf16", {"CSM_ONEDNN": "off"}, "F16", 1.1),
    ("int8", "int8", {}, "Q8_0", 1.5),
    ("int8-dynamic", "int8", {}, "Q8_0", 1.5),
    ("int4", "int4", {}, "Q4_K", 2.0),
]
# CrispASR's tokenizer adds these around the prompt; csm's prompt here gets the same ids.
BOS, EOS = 128000, 128001
# Mimi's decoder (Kyutai): model width, transformer layers and feed-forward width, SEANet.
MIMI_DIM, MIMI_LAYERS, MIMI_FFN, MIMI_CODEBOOK_DIM = 512, 8, 2048, 256


def _gguf():
    try:
        import gguf
    except ImportError:
        sys.exit("bench_ggml.py needs the `gguf` package (pip install gguf): it writes the GGUF files")
    return gguf


# --- the prompt, the same for both -------------------------------------------------------


def prompt_ids(config: CSMConfig) -> list[int]:
    """bench_csm's prompt (24 random text tokens) between the BOS and EOS CrispASR adds."""
    return [BOS, *text_prompt(config)[0][0, :, -1].tolist(), EOS]


def prompt_letters(config: CSMConfig) -> tuple[str, dict[int, str]]:
    """A text CrispASR's tokenizer turns into `prompt_ids`, and the vocabulary entries that do it.

    Its tokenizer writes "[0]" before the text and drops characters that are not in the
    vocabulary; with no merges, each remaining ASCII letter is one token. So the vocabulary
    maps one letter to each prompt id, "[", "0" and "]" stay out of it."""
    letters, spelled = {}, []
    for token in prompt_ids(config)[1:-1]:
        letters.setdefault(token, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[len(letters)])
        spelled.append(letters[token])
    return "".join(spelled), letters


def csm_prompt(ids: list[int], config: CSMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """csm's text-only frames for these ids (as bench_csm's text_prompt, other ids)."""
    tokens = torch.zeros(1, len(ids), config.audio_num_codebooks + 1, dtype=torch.long)
    tokens[..., -1] = torch.tensor(ids)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[..., -1] = True
    return tokens, mask


# --- converting the checkpoint to CrispASR's GGUF layout ---------------------------------

_LAYER_PARTS = {
    "sa_norm.scale": "attn_norm",
    "attn.q_proj.weight": "attn_q",
    "attn.k_proj.weight": "attn_k",
    "attn.v_proj.weight": "attn_v",
    "attn.output_proj.weight": "attn_output",
    "mlp_norm.scale": "ffn_norm",
    "mlp.w1.weight": "ffn_gate",
    "mlp.w3.weight": "ffn_up",
    "mlp.w2.weight": "ffn_down",
}
_TOP_LEVEL = {
    "text_embeddings.weight": "backbone.text_embd.weight",
    "audio_embeddings.weight": "backbone.audio_embd.weight",
    "codebook0_head.weight": "backbone.codebook0_head.weight",
    "backbone.norm.scale": "backbone.output_norm.weight",
    "projection.weight": "depth.projection.weight",
    "decoder.norm.scale": "depth.output_norm.weight",
    "audio_head": "depth.codebooks_head.weight",
}


def gguf_name(name: str) -> str:
    """CrispASR's name for a tensor of the published layout."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = re.fullmatch(r"(backbone|decoder)\.layers\.(\d+)\.(.+)", name)
    if not match or match[3] not in _LAYER_PARTS:
        raise ValueError(f"no GGUF name for {name}")
    stack = "backbone" if match[1] == "backbone" else "depth"
    return f"{stack}.blk.{match[2]}.{_LAYER_PARTS[match[3]]}.weight"


def rotate_half_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows reordered from interleaved pairs (published layout) to halves (NEOX RoPE)."""
    rows, dim = weight.shape
    pairs = weight.reshape(heads, rows // heads // 2, 2, dim)
    return pairs.transpose(0, 2, 1, 3).reshape(rows, dim)


def random_mimi_decoder(config: CSMConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights for the Mimi decoder CrispASR's loader requires, in its names and shapes
    (numpy order, [out, in, kernel] for convolutions, [in, out, kernel] for transposed ones)."""
    generator = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}

    def add(name: str, *shape: int) -> None:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        values = generator.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)
        tensors[name] = values if len(shape) > 1 else 1 + 0.1 * values

    for layer in range(MIMI_LAYERS):
        prefix = f"mimi.dec_tfm.layers.{layer}"
        for norm in ("norm1", "norm2"):
            add(f"{prefix}.{norm}.weight", MIMI_DIM)
            add(f"{prefix}.{norm}.bias", MIMI_DIM)
        add(f"{prefix}.attn.qkv_w", 3 * MIMI_DIM, MIMI_DIM)
        add(f"{prefix}.attn.out_w", MIMI_DIM, MIMI_DIM)
        add(f"{prefix}.ffn_up_w", MIMI_FFN, MIMI_DIM)
        add(f"{prefix}.ffn_down_w", MIMI_DIM, MIMI_FFN)
        add(f"{prefix}.ls1", MIMI_DIM)
        add(f"{prefix}.ls2", MIMI_DIM)
    add("mimi.upsample.conv3.weight", MIMI_DIM, 1, 4)  # depthwise, stride 2
    add("mimi.decoder.model.0.conv2.weight", 1024, MIMI_DIM, 7)
    add("mimi.decoder.model.0.conv2.bias", 1024)
    channels = 1024
    for stage, stride in zip((2, 5, 8, 11), (8, 6, 5, 4)):
        add(f"mimi.decoder.model.{stage}.conv2.weight", channels, channels // 2, 2 * stride)
        add(f"mimi.decoder.model.{stage}.conv2.bias", channels // 2)
        channels //= 2
        add(f"mimi.decoder.model.{stage + 1}.blk1.weight", channels // 2, channels, 3)
        add(f"mimi.decoder.model.{stage + 1}.blk1.bias", channels // 2)
        add(f"mimi.decoder.model.{stage + 1}.blk3.weight", channels, channels // 2, 1)
        add(f"mimi.decoder.model.{stage + 1}.blk3.bias", channels)
    add("mimi.decoder.model.14.conv2.weight", 1, channels, 3)
    add("mimi.decoder.model.14.conv2.bias", 1)
    # Codebooks get a row for every code the model can emit (audio_vocab_size, not Mimi's
    # 2048): random weights do emit the three codes above 2047, which CrispASR looks up.
    for group, count in (("rvq_first", 1), ("rvq_rest", config.audio_num_codebooks - 1)):
        add(f"mimi.quantizer.{group}.output_proj.weight", MIMI_DIM, MIMI_CODEBOOK_DIM, 1)
        for index in range(count):
            add(
                f"mimi.quantizer.{group}.vq.layers.{index}._codebook.embedding",
                config.audio_vocab_size,
                MIMI_CODEBOOK_DIM,
            )
    return tensors


def write_gguf(checkpoint: Path, path: Path, config: CSMConfig) -> Path:
    """The checkpoint's weights in CrispASR's CSM layout, F16 (F32 for vectors), tensor by tensor."""
    if path.is_file():
        return path
    gguf = _gguf()
    from safetensors import safe_open

    backbone, decoder = config.backbone, config.decoder
    writer = gguf.GGUFWriter(str(path.with_suffix(".partial")), arch="csm-tts", use_temp_file=False)
    writer.add_name("csm-1b-random")
    metadata = {
        "csm.backbone.n_layers": backbone.num_layers,
        "csm.backbone.d_model": backbone.dim,
        "csm.backbone.n_heads": backbone.num_heads,
        "csm.backbone.n_kv_heads": backbone.num_kv_heads,
        "csm.backbone.head_dim": backbone.head_dim,
        "csm.backbone.ff_dim": backbone.ffn_dim,
        "csm.backbone.max_pos": backbone.max_seq_len,
        "csm.depth.n_layers": decoder.num_layers,
        "csm.depth.d_model": decoder.dim,
        "csm.depth.n_heads": decoder.num_heads,
        "csm.depth.n_kv_heads": decoder.num_kv_heads,
        "csm.depth.head_dim": decoder.head_dim,
        "csm.depth.ff_dim": decoder.ffn_dim,
        "csm.depth.backbone_hidden": backbone.dim,
        "csm.text_vocab_size": config.text_vocab_size,
        "csm.audio_vocab_size": config.audio_vocab_size,
        "csm.audio_num_codebooks": config.audio_num_codebooks,
        "csm.mimi.dim": MIMI_DIM,
        "csm.mimi.n_layers": MIMI_LAYERS,
        "csm.mimi.codebook_dim": MIMI_CODEBOOK_DIM,
        "csm.mimi.n_quantizers": config.audio_num_codebooks,
        "csm.mimi.n_semantic": 1,
    }
    for key, value in metadata.items():
        writer.add_uint32(key, value)
    writer.add_float32("csm.backbone.rope_theta", backbone.rope_base)
    writer.add_float32("csm.backbone.rms_norm_eps", backbone.norm_eps)
    tokens = [f"<dummy {index}>" for index in range(config.text_vocab_size)]
    for token, letter in prompt_letters(config)[1].items():
        tokens[token] = letter
    writer.add_token_list(tokens)

    handle = safe_open(str(checkpoint / "model.safetensors"), framework="np")
    mimi = random_mimi_decoder(config)
    # (GGUF name, source) in file order; the depth decoder's token table is the backbone's
    # audio table again (its loader requires it; the transformers layout has it too).
    sources = [(gguf_name(name), name) for name in handle.keys()]  # noqa: SIM118 - a safe_open handle is no dict
    sources.append(("depth.token_embd.weight", "audio_embeddings.weight"))
    sources += [(name, None) for name in mimi]

    def tensor(name: str, source: str | None) -> np.ndarray:
        value = mimi[name] if source is None else handle.get_tensor(source)
        if source is not None and source.endswith(("q_proj.weight", "k_proj.weight")):
            llama = backbone if source.startswith("backbone.") else decoder
            heads = llama.num_heads if source.endswith("q_proj.weight") else llama.num_kv_heads
            value = rotate_half_rows(value, heads)
        return np.ascontiguousarray(value.astype(np.float32 if value.ndim == 1 else np.float16))

    shapes = {
        name: handle.get_slice(source).get_shape() if source else list(mimi[name].shape) for name, source in sources
    }
    for name, _ in sources:
        dtype = np.float32 if len(shapes[name]) == 1 else np.float16
        writer.add_tensor_info(
            name, shapes[name], np.dtype(dtype), int(np.prod(shapes[name])) * np.dtype(dtype).itemsize
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, source in sources:
        writer.write_tensor_data(tensor(name, source))
    writer.close()
    path.with_suffix(".partial").rename(path)
    return path


def quantize_gguf(tool: Path, source: Path, kind: str) -> Path:
    """CrispASR's own re-quantization of the F16 file (`q8_0`, `q4_k`)."""
    out = source.with_name(f"csm-1b-random-{kind}.gguf")
    if not out.is_file():
        partial = out.with_suffix(".partial")
        subprocess.run([str(tool), str(source), str(partial), kind], check=True, capture_output=True)
        partial.rename(out)
    return out


# --- CrispASR through its C API ----------------------------------------------------------


class _Params(ctypes.Structure):
    """`struct csm_tts_context_params` of csm_tts.h."""

    _fields_ = [
        ("n_threads", ctypes.c_int),
        ("verbosity", ctypes.c_int),
        ("use_gpu", ctypes.c_bool),
        ("temperature", ctypes.c_float),
        ("topk", ctypes.c_int),
        ("seed", ctypes.c_uint64),
        ("max_audio_tokens", ctypes.c_int),
    ]


def _crispasr(library: str, model: str, threads: int):
    lib = ctypes.CDLL(library)
    lib.csm_tts_context_default_params.restype = _Params
    lib.csm_tts_init_from_file.restype = ctypes.c_void_p
    lib.csm_tts_init_from_file.argtypes = [ctypes.c_char_p, _Params]
    lib.csm_tts_run_generate_codes.restype = ctypes.c_int
    lib.csm_tts_run_generate_codes.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    params = lib.csm_tts_context_default_params()
    params.n_threads, params.verbosity, params.seed = threads, 0, 1
    context = lib.csm_tts_init_from_file(model.encode(), params)
    if not context:
        raise RuntimeError(f"CrispASR could not load {model}")
    return lib, context


def crispasr_codes(lib, context, text: str, frames: int, codebooks: int) -> np.ndarray:
    """Greedy codes [frames, codebooks] of CrispASR's generation, capped at `frames`."""
    codes = np.zeros((frames, codebooks), dtype=np.int32)
    got = lib.csm_tts_run_generate_codes(context, text.encode(), codes.ctypes.data, frames)
    if got != frames:
        raise RuntimeError(f"CrispASR generated {got} frames, not {frames} (an all-zero frame ends it)")
    return codes


def measure_crispasr(library: str, model: str, threads: int, frames: int) -> None:
    """In a fresh process: wall times of generations of 1 + W and 1 + W + N frames (stderr has
    CrispASR's stage times, read by the caller)."""
    config = CSMConfig()
    lib, context = _crispasr(library, model, threads)
    text = prompt_letters(config)[0]
    crispasr_codes(lib, context, text, 1 + WARMUP_FRAMES, config.audio_num_codebooks)  # warm-up
    seconds = []
    for count in (1 + WARMUP_FRAMES, 1 + WARMUP_FRAMES + frames):
        start = time.perf_counter()
        crispasr_codes(lib, context, text, count, config.audio_num_codebooks)
        seconds.append(time.perf_counter() - start)
    print(json.dumps({"seconds": seconds}))


def crispasr_seconds_per_frame(library: Path, model: Path, threads: int, frames: int) -> float:
    environment = {**os.environ, "CRISPASR_CSM_BENCH": "1", "OMP_NUM_THREADS": str(threads)}
    run = subprocess.run(
        [sys.executable, __file__, "--measure-crispasr", str(library), str(model), str(threads), str(frames)],
        check=True,
        capture_output=True,
        text=True,
        env=environment,
    )
    calls = json.loads(run.stdout.splitlines()[-1])["seconds"]
    mimi = [float(ms) / 1000 for ms in re.findall(r"csm_bench: mimi_decode\s+([\d.]+) ms", run.stderr)][-2:]
    if len(mimi) != 2:
        raise RuntimeError(f"no Mimi stage times from CrispASR (CRISPASR_CSM_BENCH):\n{run.stderr[-2000:]}")
    return ((calls[1] - mimi[1]) - (calls[0] - mimi[0])) / frames


# --- csm ---------------------------------------------------------------------------------


def measure_csm(folder: str, mode: str, threads: int, frames: int) -> None:
    torch.set_num_threads(threads)
    quantize = None if mode == "bf16" else mode
    model = load_for_generation(folder, dtype=torch.bfloat16, quantize=quantize)
    print(json.dumps({"seconds_per_frame": ours_seconds_per_frame(model, frames)}))


def csm_seconds_per_frame(folder: Path, mode: str, environment: dict[str, str], threads: int, frames: int) -> float:
    output = subprocess.run(
        [sys.executable, __file__, "--measure-csm", str(folder), mode, str(threads), str(frames)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **environment},
    ).stdout
    return json.loads(output.splitlines()[-1])["seconds_per_frame"]


@torch.inference_mode()
def first_frame_agreement(checkpoint: Path, library: Path, model: Path, threads: int) -> tuple[int, int]:
    """Codes of the first frame, greedy, same prompt: csm fp32 against CrispASR on `model`."""
    config = CSMConfig()
    ids = prompt_ids(config)
    csm = load_for_generation(checkpoint)
    csm.setup_caches(1)
    tokens, mask = csm_prompt(ids, config)
    ours = csm.generate_frame(tokens, mask, torch.arange(len(ids)).unsqueeze(0), temperature=1.0, topk=1)[0]
    del csm
    lib, context = _crispasr(str(library), str(model), threads)
    theirs = crispasr_codes(lib, context, prompt_letters(config)[0], 1, config.audio_num_codebooks)[0]
    return int((ours.numpy() == theirs).sum()), config.audio_num_codebooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crispasr", type=Path, help="CrispASR's CSM C API as a shared library (see above)")
    parser.add_argument("--crispasr-quantize", type=Path, help="CrispASR's crispasr-quantize tool")
    parser.add_argument("--frames", type=int, default=16, help="frames timed per configuration")
    parser.add_argument("--threads", type=int, default=2, help="threads for both (torch threads, ggml threads)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/csm-bench"), help="where checkpoints go")
    parser.add_argument(
        "--measure-crispasr", nargs=4, metavar=("LIB", "GGUF", "THREADS", "FRAMES"), help=argparse.SUPPRESS
    )
    parser.add_argument("--measure-csm", nargs=4, metavar=("DIR", "MODE", "THREADS", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_crispasr:
        library, model, threads, frames = args.measure_crispasr
        measure_crispasr(library, model, int(threads), int(frames))
        return
    if args.measure_csm:
        folder, mode, threads, frames = args.measure_csm
        measure_csm(folder, mode, int(threads), int(frames))
        return
    if not args.crispasr or not args.crispasr_quantize:
        parser.error("--crispasr and --crispasr-quantize are required (the built CrispASR library and tool)")
    _gguf()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    config = CSMConfig()
    checkpoint = write_random_checkpoint(args.workdir / "csm-1b-random", config)
    folders = {"bf16": checkpoint}
    for quantize in ("int8", "int4"):
        folders[quantize] = args.workdir / f"csm-1b-random-{quantize}"
        if not (folders[quantize] / "config.json").is_file():
            save_quantized(load_csm(checkpoint, dtype=torch.bfloat16), folders[quantize], quantize)
    f16 = write_gguf(checkpoint, args.workdir / "csm-1b-random-f16.gguf", config)
    ggufs = {"F16": f16, "Q8_0": quantize_gguf(args.crispasr_quantize, f16, "q8_0")}
    ggufs["Q4_K"] = quantize_gguf(args.crispasr_quantize, f16, "q4_k")
    print(f"random full-size checkpoints and GGUF files: {args.workdir} ({time.perf_counter() - start:.0f} s)")
    print(f"torch {torch.__version__}, {args.threads} threads for both; prompt {PROMPT_LENGTH} text tokens\n")

    agree, codebooks = first_frame_agreement(checkpoint, args.crispasr, f16, args.threads)
    print(f"first frame, greedy, same prompt: csm fp32 and ggml F16 agree on {agree}/{codebooks} codes\n")

    floor, kernel = matrix_vector_floor_seconds(bf16_bytes_per_frame(config))
    rows, ggml = [], {}
    for ours, folder, environment, theirs, target in PAIRS:
        csm_seconds = csm_seconds_per_frame(folders[folder], ours, environment, args.threads, args.frames)
        if theirs not in ggml:
            ggml[theirs] = crispasr_seconds_per_frame(args.crispasr, ggufs[theirs], args.threads, args.frames)
        label = " ".join([ours, *(f"{name}={value}" for name, value in environment.items())])
        rows.append((label, theirs, csm_seconds, ggml[theirs], target))

    print(
        f"bf16 floor in this run: {floor:.3f} s/frame ({kernel}, {bf16_bytes_per_frame(config) / 1e9:.2f} GB a frame)\n"
    )
    print(f"| batch 1, {args.frames} frames, s/frame | csm | ggml (CrispASR) | ggml / csm | target | |")
    print("|---|---|---|---|---|---|")
    for ours, theirs, csm_seconds, ggml_seconds, target in rows:
        ratio = ggml_seconds / csm_seconds
        verdict = "met" if ratio >= target else "missed"
        print(
            f"| csm {ours} vs ggml {theirs} | {csm_seconds:.3f} | {ggml_seconds:.3f} | {ratio:.2f}x | "
            f">= {target}x | {verdict} |"
        )


if __name__ == "__main__":
    main()
