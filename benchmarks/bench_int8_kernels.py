"""int8 products on CSM-1B's shapes: weight-only against dynamic (int8 x int8) routes, and bf16.

    python benchmarks/bench_int8_kernels.py [--rows 1,8,128] [--threads N] [--repeats 5]

For each fused product of the backbone and the depth decoder (qkv, output, w1|w3, w2) and each
row count (1: a batch-1 decode step, 8: the engine's batch, 128: a prefill chunk), the median
time of one product per candidate, as G weights/s (weights read per second) and GMAC/s:

- bf16: `F.linear` on the bf16 weight (`torch.mv` too for one row);
- int8: the weight-only kernel (`QuantizedLinear`, `aten._weight_int8pack_mm`);
- int8-dynamic routes of `DynamicInt8Linear`: "fbgemm" (`quantized::linear_dynamic`,
  prepacked weight) and "int_mm" (`torch._int_mm`);
- onednn: `onednn::qlinear_pointwise` with a prepacked weight, rows quantized to uint8 here
  (kept as the measured alternative; csm does not use it).

Several distinct copies of each weight (64 MB of int8 or more) are cycled, so that every
product streams its weight from memory as in a frame. Candidates run interleaved, repeat after
repeat, and the median is reported: the machine may be shared. It also prints each route's
relative RMS error against the dequantized weight's float product.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from csm.int8_dynamic import DynamicInt8Linear, fbgemm_available
from csm.llama import FLAVORS
from csm.quantize import QuantizedLinear, dequantize, quantize

STREAMED_BYTES = 64e6


def layer_shapes(flavor: str) -> list[tuple[int, int]]:
    """[N, K] of a layer's fused products: qkv, output, w1|w3, w2."""
    config = FLAVORS[flavor]
    kv = config.num_kv_heads * config.head_dim
    attention = config.num_heads * config.head_dim
    return [
        (attention + 2 * kv, config.dim),
        (config.dim, attention),
        (2 * config.ffn_dim, config.dim),
        (config.dim, config.ffn_dim),
    ]


def candidates(weights: list[torch.Tensor], x: torch.Tensor) -> dict[str, list]:
    """name -> one callable per weight copy."""
    quantized = [quantize(weight, "int8") for weight in weights]
    bf16 = [weight.to(torch.bfloat16) for weight in weights]
    found = {"bf16 linear": [lambda w=w: F.linear(x, w) for w in bf16]}
    if x.shape[0] == 1:
        found["bf16 mv"] = [lambda w=w: torch.mv(w, x[0]) for w in bf16]
    found["int8 weight-only"] = [lambda m=QuantizedLinear(q): m(x) for q in quantized]
    routes = ["fbgemm", "int_mm"] if fbgemm_available() else ["int_mm"]
    for route in routes:
        found[f"int8-dynamic {route}"] = [lambda m=DynamicInt8Linear(q, route=route): m(x) for q in quantized]
    found["onednn qlinear u8"] = [_onednn(q, x) for q in quantized]
    return found


def _onednn(weight, x: torch.Tensor):
    packed = torch.ops.onednn.qlinear_prepack(weight.data, list(x.shape))
    scales, zeros = weight.scales.float(), torch.zeros(weight.shape[0], dtype=torch.int64)

    def product() -> torch.Tensor:
        # Symmetric per-row int8 shifted to uint8 (oneDNN's signed-activation path is a slow
        # reference loop on this torch), the row scale applied to the float output.
        step = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32) / 127
        codes = (torch.round(x / step) + 128).to(torch.uint8)
        out = torch.ops.onednn.qlinear_pointwise(
            codes, 1.0, 128, packed, scales, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
        return (out * step).to(torch.bfloat16)

    return product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,128", help="comma-separated row counts")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    shapes = dict.fromkeys(layer_shapes("llama-1B") + layer_shapes("llama-100M"))
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability {capability}")
    print("| N x K | rows | candidate | ms | G weights/s | GMAC/s | rel. RMS error |")
    print("|---|---|---|---|---|---|---|")
    for rows in (int(part) for part in args.rows.split(",")):
        for out_features, in_features in shapes:
            copies = max(2, int(STREAMED_BYTES // (out_features * in_features)))
            weights = [
                torch.randn(out_features, in_features, generator=generator) / in_features**0.5 for _ in range(copies)
            ]
            x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
            found = candidates(weights, x)
            reference = x.float() @ dequantize(quantize(weights[0], "int8"), torch.float32).t()
            errors = {
                name: float((calls[0]().float().reshape(reference.shape) - reference).norm() / reference.norm())
                for name, calls in found.items()
                if not name.startswith("bf16")
            }
            times = {name: [] for name in found}
            with torch.inference_mode():
                for _ in range(args.repeats):
                    for name, calls in found.items():
                        calls[-1]()
                        started = time.perf_counter()
                        for call in calls:
                            call()
                        times[name].append((time.perf_counter() - started) / len(calls))
            for name, measured in times.items():
                seconds = statistics.median(measured)
                weights_per_second = out_features * in_features / seconds
                error = f"{errors[name]:.4f}" if name in errors else ""
                print(
                    f"| {out_features} x {in_features} | {rows} | {name} | {seconds * 1e3:.3f} | "
                    f"{weights_per_second / 1e9:.1f} | {rows * weights_per_second / 1e9:.1f} | {error} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
