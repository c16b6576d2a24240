"""Watermark speed and memory: ours against the silentcipher package, same weights.

    python benchmarks/bench_watermark.py [--seconds 10] [--shifts 2] [--repeats 2] [--weights FOLDER]

Embeds and verifies `--seconds` of speech-like audio at 44.1 kHz with both implementations
on the same weights (random ones in the published layout, or the real iteration folder
given by `--weights`). Every case runs in a fresh process, after a warm-up on 1 s of audio,
so that its peak memory (highest RSS minus the RSS before the calls) is its own; times
are the best of `--repeats` calls.

Verify costs one message-decoder pass per phase shift tried. The reference always tries
all 205 shifts and then decodes the winner again (206 passes); ours stops at the first
perfect score, which a freshly marked clip reaches at shift 0 (1 pass), and otherwise
tries all 205. Full searches take over an hour on a 2-core CPU, so both are timed over the
first `--shifts` shifts and extrapolated.
The reference needs `pip install --no-deps silentcipher==1.0.5` (plus scipy and pyyaml).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csm.watermark import CSM_KEY, Watermarker, watermarker
from tests.factories.watermark import write_silentcipher_repo

RATE = 44_100
ALL_SHIFTS = len(watermarker.SHIFTS)


def speech_like(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.7 * t)) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 + 0.5 * np.clip(np.sin(2 * np.pi * 3 * t), 0, None)
    noise = np.random.default_rng(0).standard_normal(t.shape)
    return (0.1 * voiced * envelope + 0.005 * noise).astype(np.float32)


def load_reference(folder: Path):
    # import-only dependencies of silentcipher that 44.1 kHz in-memory use never calls
    sys.modules.setdefault("librosa", types.ModuleType("librosa"))
    sys.modules.setdefault("pydub", types.SimpleNamespace(AudioSegment=None))
    import silentcipher

    return silentcipher.get_model(
        "44.1k", ckpt_path=str(folder), config_path=str(folder / "hparams.yaml"), device="cpu"
    )


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def run_case(case: str, folder: Path, seconds: float, shifts: int, repeats: int) -> dict:
    """Best time of `repeats` calls of `case`, and their peak memory, in this process."""
    torch.set_grad_enabled(False)
    reference = case.startswith("reference")
    model = load_reference(folder) if reference else Watermarker.from_pretrained(folder, device="cpu")
    if reference:
        model.config.HOP_LENGTH = 10 * shifts  # the search tries range(0, HOP_LENGTH, 10)
        calls = {
            "reference embed": lambda audio: model.encode_wav(
                audio, RATE, list(CSM_KEY), message_sdr=36, calc_sdr=False
            ),
            "reference verify": lambda audio: model.decode_wav(audio, RATE, phase_shift_decoding=True),
        }
    else:
        watermarker.SHIFTS = watermarker.SHIFTS[:shifts]
        calls = {
            "ours embed": lambda audio: model.encode(torch.from_numpy(audio), RATE),
            "ours verify": lambda audio: model.verify(torch.from_numpy(audio), RATE),
            "ours verify, stops at shift 0": lambda audio: model.decode(torch.from_numpy(audio), RATE, False),
        }
    call = calls[case]
    call(speech_like(1.0))  # warm-up: weights loaded, kernels chosen
    audio = speech_like(seconds)
    before = resident_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(audio)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"seconds": min(times), "peak_mb_per_s": max(peak, 0) / 1e6 / seconds}


def measure(case: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--case", case, "--folder", str(folder), "--seconds", str(args.seconds)]
    command += ["--shifts", str(args.shifts), "--repeats", str(args.repeats)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--shifts", type=int, default=2, help="shifts timed before extrapolating a full search")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per case (the best counts)")
    parser.add_argument("--weights", type=Path, help="the real 44_1_khz/73999_iteration folder (default: random)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.folder, args.seconds, args.shifts, args.repeats)))
        return
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.weights or write_silentcipher_repo(temporary)
        m = {
            case: measure(case, folder, args)
            for case in (
                "ours embed",
                "reference embed",
                "ours verify, stops at shift 0",
                "ours verify",
                "reference verify",
            )
        }
    # extrapolate the searches: the reference tried `shifts` shifts and decoded once more
    reference_pass = m["reference verify"]["seconds"] / (args.shifts + 1)
    reference_verify = reference_pass * (ALL_SHIFTS + 1)
    ours_full = m["ours verify"]["seconds"] / args.shifts * ALL_SHIFTS
    rows = [
        ("embed", m["ours embed"], m["reference embed"]["seconds"], m["reference embed"]),
        (
            "verify, marked (stops at shift 0)",
            m["ours verify, stops at shift 0"],
            reference_verify,
            m["reference verify"],
        ),
        (
            "verify, full search (205 shifts)",
            {**m["ours verify"], "seconds": ours_full},
            reference_verify,
            m["reference verify"],
        ),
    ]
    print(
        f"{args.seconds:g} s of audio at 44.1 kHz, CPU, {torch.get_num_threads()} threads; "
        f"verify searches extrapolated from {args.shifts} shifts"
    )
    print(f"{'case':<36}{'ours s':>10}{'reference s':>13}{'speed-up':>10}{'ours MB/s':>11}{'ref MB/s':>10}")
    for name, ours, reference_seconds, reference in rows:
        print(
            f"{name:<36}{ours['seconds']:>10.2f}{reference_seconds:>13.2f}{reference_seconds / ours['seconds']:>9.1f}x"
            f"{ours['peak_mb_per_s']:>11.1f}{reference['peak_mb_per_s']:>10.1f}"
        )


if __name__ == "__main__":
    main()
