"""`csm say --batch`: every line of a file spoken through the continuous-batching engine."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from csm.cli.options import SAMPLE_RATE, load_generator


def add_batch(say: argparse.ArgumentParser) -> None:
    say.add_argument(
        "--batch",
        type=Path,
        metavar="FILE",
        help="speak each line of FILE into its own file in the -o folder (NNNN.wav, N = line number), "
        'many at once; a line is plain text or JSON: {"text": ..., "speaker": N, "voice": NAME, "seed": N}. '
        "Each line is one utterance of at most --max-seconds; a line without a seed gets --seed plus its index",
    )
    say.add_argument(
        "--max-batch",
        type=_positive,
        default=8,
        metavar="N",
        help="with --batch: utterances generated together (default 8)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def say_batch(args: argparse.Namespace) -> int:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from csm.audio import load_audio, save_audio
    from csm.engine import Engine, Request
    from csm.generator import Segment
    from csm.voices import load_voice

    if args.text != "-" or args.stream:
        raise ValueError("--batch reads the texts from FILE: give no TEXT and no --stream")
    lines = _batch_lines(args.batch, args)
    folder = Path(args.output).expanduser()
    if args.output == "-" or folder.exists() and not folder.is_dir():
        raise ValueError(f"with --batch, -o names a folder for the files, got {args.output}")
    contexts = [
        Segment(
            speaker=args.speaker if context["speaker"] is None else context["speaker"],
            text=context["text"],
            audio=load_audio(context["audio"], SAMPLE_RATE),
        )
        for context in args.context
    ]
    voices = {}
    for line in lines:
        key = (line["voice"], line["speaker"])
        if line["voice"] and key not in voices:
            voices[key] = load_voice(line["voice"], line["speaker"], args.model)
    folder.mkdir(parents=True, exist_ok=True)
    generator = load_generator(args)
    width = max(4, len(str(lines[-1]["number"])))

    def speak(engine: Engine, line: dict) -> float:
        prompts = [voices[line["voice"], line["speaker"]]] if line["voice"] else []
        request = Request(
            line["text"],
            line["speaker"],
            [*prompts, *contexts],
            args.max_seconds * 1000,
            args.temperature,
            args.topk,
            line["seed"],
        )
        audio = engine.submit(request).result()
        save_audio(folder / f"{line['number']:0{width}d}.wav", audio, generator.sample_rate)
        return audio.numel() / generator.sample_rate

    started = time.perf_counter()
    seconds = 0.0
    # One thread per row submits a line, waits for its clip (watermarked) and writes it. The
    # engine closes first on an error, which ends the threads' waits.
    with ThreadPoolExecutor(args.max_batch) as pool, Engine(generator, args.max_batch, args.max_batch) as engine:
        futures = [pool.submit(speak, engine, line) for line in lines]
        with tqdm(total=len(lines), desc="speaking", unit="utterance", file=sys.stderr) as bar:
            for future in as_completed(futures):
                seconds += future.result()
                bar.update()
    wall = time.perf_counter() - started
    frames = round(seconds * 1000 / 80)
    print(
        f"{folder}: {len(lines)} files, {seconds:.2f} s of audio in {wall:.2f} s ({frames / wall:.1f} frames/s)",
        file=sys.stderr,
    )
    return 0


def _batch_lines(path: Path, args: argparse.Namespace) -> list[dict]:
    """The utterances of a --batch file: number (its line), text, speaker, voice and seed, all checked."""
    from csm.voices import VOICE_TRANSCRIPTS

    if not path.is_file():
        raise ValueError(f"batch file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        line = {"text": raw.strip()}
        if raw.lstrip().startswith("{"):
            try:
                line = json.loads(raw)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON: {error}") from None
            unknown = set(line) - {"text", "speaker", "voice", "seed"}
            if unknown:
                raise ValueError(f"{where}: unknown fields {sorted(unknown)}; a line has text, speaker, voice, seed")
        seed = args.seed + len(lines) if args.seed is not None else None
        entry = {
            "number": number,
            "text": line.get("text"),
            "speaker": line.get("speaker", args.speaker),
            "voice": line.get("voice", args.voice),
            "seed": line.get("seed", seed),
        }
        if not isinstance(entry["text"], str) or not entry["text"].strip():
            raise ValueError(f"{where}: text must be a non-empty string, got {entry['text']!r}")
        for name in ("speaker", "seed"):
            value = entry[name]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{where}: {name} must be a non-negative integer, got {value!r}")
        if entry["voice"] is not None and entry["voice"] not in VOICE_TRANSCRIPTS:
            raise ValueError(
                f"{where}: unknown voice {entry['voice']!r}: built-in voices are {', '.join(VOICE_TRANSCRIPTS)}"
            )
        lines.append(entry)
    if not lines:
        raise ValueError(f"batch file {path} has no text")
    return lines
