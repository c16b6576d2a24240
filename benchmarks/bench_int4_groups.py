"""int4 group sizes on CSM-1B's shapes: the time of a frame's products and their error.

    python benchmarks/bench_int4_groups.py [--threads N] [--repeats 3]

For each group size the int4 CPU kernel takes (32, 64, 128, 256): the products of one frame
(the backbone's 16 layers once, the depth decoder's 4 layers 31 times, each weight a distinct
random matrix so that a frame streams memory as it does in the model), the relative error of
their outputs against the bf16 weights, and the bytes of scales and zeros for a whole model.
How `csm.quantize.INT4_GROUP_SIZE` was chosen.
"""

from __future__ import annotations

import argparse
import time

import torch

from csm.llama import FLAVORS
from csm.quantize import QuantizedLinear, quantize

GROUP_SIZES = (32, 64, 128, 256)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    backbone = layer_shapes("llama-1B") * FLAVORS["llama-1B"].num_layers
    decoder = layer_shapes("llama-100M") * FLAVORS["llama-100M"].num_layers
    weights = {
        shape: torch.randn(shape, generator=generator).div(shape[1] ** 0.5).to(torch.bfloat16)
        for shape in set(backbone + decoder)
    }
    inputs = {k: torch.randn(1, k, generator=generator).to(torch.bfloat16) for _, k in weights}
    print(f"{'group':>5}  {'frame products ms':>17}  {'relative error':>14}  {'scales+zeros MB':>15}")
    for group_size in GROUP_SIZES:
        error = []
        for (n, k), weight in weights.items():
            x = torch.randn(8, k, generator=generator).to(torch.bfloat16)
            exact = x.float() @ weight.float().t()
            out = QuantizedLinear(quantize(weight, "int4", group_size))(x).float()
            error.append(float((out - exact).norm() / exact.norm()))
        backbone_layers = [QuantizedLinear(quantize(weights[shape], "int4", group_size)) for shape in backbone]
        decoder_layers = [QuantizedLinear(quantize(weights[shape], "int4", group_size)) for shape in decoder]
        for layer in backbone_layers + decoder_layers:
            layer(inputs[layer.in_features])
        start = time.perf_counter()
        for _ in range(args.repeats):
            for layer in backbone_layers:
                layer(inputs[layer.in_features])
            for _ in range(31):
                for layer in decoder_layers:
                    layer(inputs[layer.in_features])
        seconds = (time.perf_counter() - start) / args.repeats
        # A bf16 scale and zero per group of every quantized weight of the model.
        scale_bytes = sum(n * k // group_size * 4 for n, k in backbone + decoder)
        print(f"{group_size:>5}  {seconds * 1e3:>17.1f}  {sum(error) / len(error):>14.4f}  {scale_bytes / 1e6:>15.0f}")


if __name__ == "__main__":
    main()
