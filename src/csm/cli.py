"""The `csm` command: speak text, render a scripted conversation, check watermarks, show setup.

A thin shell over the Python API. Every user error ends as one line on stderr and exit
status 2; `csm watermark check` exits 0 when every file is watermarked and 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from csm.errors import CSMError

# Mimi's rate: every audio file is read at it and every output written at it.
SAMPLE_RATE = 24_000

_EXIT_ERROR = 2
_EXIT_NOT_WATERMARKED = 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: the process's) and return its exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("csm: interrupted", file=sys.stderr)
        return 130
    except (CSMError, ValueError, OSError, torch.OutOfMemoryError) as error:
        print(f"csm: error: {error}", file=sys.stderr)
        return _EXIT_ERROR


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other csm error."""

    def error(self, message: str):
        self.exit(_EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="csm",
        description="Sesame's CSM-1B text-to-speech in plain PyTorch: 24 kHz speech, watermarked.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND", parser_class=_Parser)

    say = commands.add_parser(
        "say",
        help="speak text into an audio file",
        description="Speak TEXT. Long text is split at sentence ends and spoken chunk by chunk, "
        "each chunk hearing the ones before it, so the voice stays the same.",
    )
    say.add_argument("text", nargs="?", default="-", help="what to say; '-' or nothing reads it from stdin")
    _add_output(say, batch="; with --batch, the folder for the files")
    say.add_argument("--speaker", type=_speaker, default=0, metavar="N", help="speaker id (default 0)")
    say.add_argument(
        "--context",
        nargs=2,
        action=_ContextAction,
        default=[],
        metavar=("AUDIO", "TRANSCRIPT"),
        help="an earlier utterance to continue from: its audio file and what it says (repeatable)",
    )
    say.add_argument(
        "--context-speaker",
        type=_speaker,
        action=_ContextSpeakerAction,
        metavar="N",
        help="speaker id of the --context just before (default: --speaker)",
    )
    say.add_argument("--voice", choices=_voice_names(), help="a built-in voice (model repo prompts)")
    say.add_argument(
        "--stream",
        action="store_true",
        help="with -o -, write raw PCM while it is generated: each 1.04 s clip is watermarked "
        "on its own and written when complete (with --no-watermark: each frame as it is decoded)",
    )
    _add_batch(say)
    _add_generation(say, default_seconds=30.0)
    say.set_defaults(run=_say)

    converse = commands.add_parser(
        "converse",
        help="render a scripted conversation",
        description="Render the turns of SCRIPT, each with the prompts and earlier turns as context. "
        'SCRIPT is JSON: {"prompts": {"0": "conversational_a", "1": {"audio": "b.wav", "text": '
        '"what b.wav says"}}, "turns": [{"speaker": 0, "text": "Hey how are you doing?"}, ...]}. '
        "Prompts are optional; a prompt is a built-in voice name or an audio file (relative to "
        "SCRIPT) with its transcript.",
    )
    converse.add_argument("script", type=Path, help="the conversation, a JSON file")
    _add_output(converse)
    _add_generation(converse, default_seconds=10.0)
    converse.set_defaults(run=_converse, stream=False)

    watermark = commands.add_parser("watermark", help="watermark tools")
    watermark_commands = watermark.add_subparsers(
        title="commands", required=True, metavar="COMMAND", parser_class=_Parser
    )
    check = watermark_commands.add_parser(
        "check",
        help="say whether audio files carry the watermark",
        description="Print 'Watermarked' or 'Not watermarked' for each FILE. "
        "Exit status 0 when all are watermarked, 1 when any is not, 2 on errors.",
    )
    check.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files (wav, flac, ogg, ...)")
    check.add_argument(
        "--watermarker",
        default="sony/silentcipher",
        metavar="SOURCE",
        help="watermark weights: hub repo, folder or file",
    )
    check.add_argument(
        "--watermark-key",
        type=_key,
        default=None,
        metavar="K1,...,K5",
        help="the 5-byte key (default: CSM's public key)",
    )
    check.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    check.set_defaults(run=_check)

    quantize = commands.add_parser(
        "quantize",
        help="write a quantized copy of the CSM weights",
        description="Quantize the linears of CSM (SOURCE: hub repo, folder or file) to int8 or int4 "
        "and write FOLDER: model.safetensors, config.json and the model's tokenizer and voice prompts. "
        "Use FOLDER as --model; it loads quantized, offline.",
    )
    quantize.add_argument("source", metavar="SOURCE", help="CSM weights: hub repo, folder or file")
    quantize.add_argument("-o", "--output", required=True, type=Path, metavar="FOLDER", help="folder to write")
    quantize.add_argument("--to", required=True, choices=("int8", "int4"), help="the quantized format")
    quantize.add_argument("--revision", help="revision of a hub SOURCE")
    quantize.set_defaults(run=_quantize)
    _add_finetune_commands(commands)
    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible speech server",
        description="Serve POST /v1/audio/speech (OpenAI's API), voices, /v1/models, /health, /metrics and a "
        "web page at /, batching concurrent requests. Needs the serve extra: pip install 'csm[serve]'.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _add_sources(serve)
    serve.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    serve.add_argument("--dtype", help="CSM number format: float32, bfloat16 or float16 (default: best for the device)")
    _add_speed(serve)
    serve.add_argument(
        "--adapter", metavar="SOURCE", help="a fine-tuned LoRA adapter (PEFT format): hub repo, folder or file"
    )
    serve.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests generated together (default 8)")
    serve.add_argument(
        "--max-queue", type=int, default=64, metavar="N",
        help="requests waiting beyond those; more get 429 (default 64)",
    )  # fmt: skip
    serve.add_argument(
        "--api-key", metavar="KEY", help="require Authorization: Bearer KEY on every endpoint but /health "
        "(default: the CSM_API_KEY environment variable; none: no key)",
    )  # fmt: skip
    serve.add_argument(
        "--voices-dir", type=Path, default=Path("~/.local/share/csm/voices"), metavar="DIR",
        help="where uploaded voices are kept (default ~/.local/share/csm/voices)",
    )  # fmt: skip
    serve.add_argument(
        "--cors-origin", action="append", default=[], metavar="ORIGIN",
        help="allow browser calls from ORIGIN (repeatable)",
    )  # fmt: skip
    serve.add_argument("--no-watermark", action="store_true", help="do not watermark any response (logged at startup)")
    serve.add_argument(
        "--watermark-key", type=_key, default=None, metavar="K1,...,K5", help="your own 5-byte watermark key"
    )
    serve.set_defaults(run=_serve)

    info = commands.add_parser("info", help="show versions, device and where the weights are")
    _add_sources(info)
    info.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    info.add_argument("--dtype", help="float32, bfloat16 or float16 (default: best for the device)")
    info.set_defaults(run=_info)

    _add_bench(commands)
    return parser


def _add_output(command: argparse.ArgumentParser, batch: str = "") -> None:
    command.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="PATH",
        help=f"audio file to write (.wav, .flac or .ogg), or '-' for raw 16-bit 24 kHz mono PCM on stdout{batch}",
    )


def _add_sources(command: argparse.ArgumentParser, *, watermarker: bool = True) -> None:
    command.add_argument(
        "--model", default="sesame/csm-1b", metavar="SOURCE", help="CSM weights: hub repo, folder or file"
    )
    command.add_argument(
        "--mimi",
        default="kyutai/moshiko-pytorch-bf16",
        metavar="SOURCE",
        help="Mimi codec weights: hub repo, folder or file",
    )
    command.add_argument(
        "--tokenizer",
        metavar="SOURCE",
        help="text tokenizer: hub repo, folder or tokenizer.json (default: the model's)",
    )
    if watermarker:
        command.add_argument(
            "--watermarker",
            default="sony/silentcipher",
            metavar="SOURCE",
            help="watermark weights: hub repo, folder or file",
        )


def _add_generation(command: argparse.ArgumentParser, default_seconds: float) -> None:
    command.add_argument("--seed", type=int, help="random seed, for reproducible output")
    command.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (default 0.9)")
    command.add_argument("--topk", type=int, default=50, help="sample among the K most likely codes (default 50)")
    command.add_argument(
        "--max-seconds",
        type=float,
        default=default_seconds,
        metavar="S",
        help=f"longest audio per chunk or turn, in seconds (default {default_seconds:g})",
    )
    command.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    command.add_argument(
        "--dtype", help="CSM number format: float32, bfloat16 or float16 (default: best for the device)"
    )
    _add_speed(command)
    _add_sources(command)
    command.add_argument(
        "--adapter", metavar="SOURCE", help="a fine-tuned LoRA adapter (PEFT format): hub repo, folder or file"
    )
    command.add_argument("--no-watermark", action="store_true", help="do not watermark the output")
    command.add_argument(
        "--watermark-key", type=_key, default=None, metavar="K1,...,K5", help="your own 5-byte watermark key"
    )


def _add_speed(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="weight-only quantization of CSM's linears (bfloat16 activations): faster and smaller, "
        "slightly different output; a folder from `csm quantize` is quantized already",
    )
    command.add_argument(
        "--compile",
        action="store_true",
        help="compile CSM's frame step with torch.compile (the first frame waits for the compiler)",
    )


class _ContextAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        audio, transcript = values
        getattr(namespace, self.dest).append({"audio": audio, "text": transcript, "speaker": None})


class _ContextSpeakerAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        if not namespace.context:
            parser.error("--context-speaker must follow the --context it belongs to")
        namespace.context[-1]["speaker"] = values


def _speaker(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"speaker must be a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"speaker must be a non-negative integer, got {text!r}")
    return value


def _key(text: str) -> list[int]:
    try:
        key = [int(part) for part in text.split(",")]
    except ValueError:
        key = []
    if len(key) != 5 or not all(0 <= byte <= 255 for byte in key):
        raise argparse.ArgumentTypeError(f"a watermark key is 5 comma-separated bytes (0-255), got {text!r}")
    return key


def _voice_names() -> list[str]:
    from csm.voices import VOICE_TRANSCRIPTS

    return sorted(VOICE_TRANSCRIPTS)


def _say(args: argparse.Namespace) -> int:
    from csm.audio import load_audio
    from csm.generator import Segment
    from csm.longform import Turn, split_sentences
    from csm.voices import load_voice

    if args.batch is not None:
        return _say_batch(args)
    if args.stream and args.output != "-":
        raise ValueError("--stream writes raw PCM as it is made: use it with -o -")
    text = _read_text(args.text)
    _check_output(args.output)
    # Everything the user named is read before the (slow) model loading, so mistakes show at once.
    prompts = [load_voice(args.voice, args.speaker, args.model)] if args.voice else []
    prompts += [
        Segment(
            speaker=args.speaker if context["speaker"] is None else context["speaker"],
            text=context["text"],
            audio=load_audio(context["audio"], SAMPLE_RATE),
        )
        for context in args.context
    ]
    turns = [Turn(args.speaker, chunk) for chunk in split_sentences(text)]
    return _render(_load_generator(args), turns, prompts, args)


def _converse(args: argparse.Namespace) -> int:
    _check_output(args.output)
    script = _read_script(args.script)
    turns = _script_turns(script, args.script)
    prompts = _script_prompts(script, args.script, args.model)
    return _render(_load_generator(args), turns, prompts, args)


def _render(generator, turns, prompts, args: argparse.Namespace) -> int:
    """Generate `turns` after `prompts`, show progress, write the output, print one summary line."""
    from csm.audio import save_audio, write_pcm16
    from csm.longform import generate_turns
    from csm.watermark.stream import ClipMarker

    frame_size = generator.sample_rate * 80 // 1000
    # A live stream is marked clip by clip (the watermark needs about a second of audio).
    marker = ClipMarker(generator.watermark) if args.stream and not args.no_watermark else None

    def write(chunk: torch.Tensor) -> None:
        for clip in marker.push(chunk) if marker else [chunk]:
            write_pcm16(sys.stdout.buffer, clip)

    started = time.perf_counter()
    with ExitStack() as stack:
        bar = None

        def on_chunk(chunk: torch.Tensor) -> None:
            nonlocal bar
            if bar is None:
                # Opened at the first frame, so a request that fails at once shows only its error line.
                bar = stack.enter_context(tqdm(desc="generating", unit="frame", file=sys.stderr))
            bar.update(chunk.numel() // frame_size)
            if args.stream:
                write(chunk)

        segments = generate_turns(
            generator,
            turns,
            prompts,
            max_audio_length_ms=args.max_seconds * 1000,
            temperature=args.temperature,
            topk=args.topk,
            seed=args.seed,
            on_chunk=on_chunk,
        )
    audio = torch.cat([segment.audio for segment in segments])
    for clip in marker.finish() if marker else []:
        write_pcm16(sys.stdout.buffer, clip)
    if not args.stream:
        audio = generator.watermark(audio)
        if args.output == "-":
            write_pcm16(sys.stdout.buffer, audio)
        else:
            save_audio(args.output, audio, generator.sample_rate)
    wall = time.perf_counter() - started
    seconds = audio.numel() / generator.sample_rate
    factor = f"{wall / seconds:.2f}" if seconds else "n/a"
    target = "stdout" if args.output == "-" else args.output
    print(f"{target}: {seconds:.2f} s of audio in {wall:.2f} s (real-time factor {factor})", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from csm.server.main import ServeOptions, api_key_from_environment, serve
    except ImportError as error:
        missing = error.name or "a dependency"
        raise ValueError(f"csm serve needs the serve extra ({missing} is missing): pip install 'csm[serve]'") from None
    from csm.devices import default_dtype, parse_dtype

    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be 0-65535, got {args.port}")
    device = _device(args.device)
    serve(
        ServeOptions(
            host=args.host,
            port=args.port,
            model=args.model,
            mimi=args.mimi,
            tokenizer=args.tokenizer,
            watermarker=args.watermarker,
            device=device,
            dtype=parse_dtype(args.dtype) if args.dtype else default_dtype(device),
            quantize=args.quantize,
            compile=args.compile,
            adapter=args.adapter,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            api_key=args.api_key or api_key_from_environment(),
            voices_dir=str(args.voices_dir.expanduser()),
            cors_origins=tuple(args.cors_origin),
            watermark=False if args.no_watermark else (args.watermark_key or True),
        )
    )
    return 0


# `csm say --batch`: every line of a file spoken through the continuous-batching engine.


def _add_batch(say: argparse.ArgumentParser) -> None:
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


def _say_batch(args: argparse.Namespace) -> int:
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
    generator = _load_generator(args)
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


def _check(args: argparse.Namespace) -> int:
    from csm.audio import read_audio
    from csm.watermark import CSM_KEY, Watermarker
    from csm.watermark.watermarker import SHIFTS

    watermarker = Watermarker.from_pretrained(args.watermarker, device=_device(args.device))
    key = args.watermark_key or CSM_KEY
    all_marked = True
    for path in args.files:
        audio, sample_rate = read_audio(path)
        # Unmarked audio is read at every cut (minutes per second of audio on a CPU): show it.
        with tqdm(total=len(SHIFTS), desc=f"checking {path}", unit="cut", leave=False, file=sys.stderr) as bar:
            marked = watermarker.verify(audio, sample_rate, key=key, progress=bar.update)
        all_marked &= marked
        print(f"{'Watermarked' if marked else 'Not watermarked'}: {path}")
    return 0 if all_marked else _EXIT_NOT_WATERMARKED


def _quantize(args: argparse.Namespace) -> int:
    from csm.checkpoints import load_csm
    from csm.quantized_checkpoint import WEIGHTS_FILE, save_quantized

    if args.output.exists() and any(args.output.iterdir()):
        raise ValueError(f"{args.output} is not empty: choose a new folder")
    started = time.perf_counter()
    model = load_csm(args.source, revision=args.revision, dtype=torch.bfloat16)
    save_quantized(model, args.output, args.to, source=args.source, revision=args.revision)
    size = (args.output / WEIGHTS_FILE).stat().st_size
    print(
        f"{args.output}: {args.to} weights, {size / 1e9:.2f} GB, in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    from csm import checkpoints, text
    from csm.devices import default_dtype, parse_dtype
    from csm.hub import cached_file
    from csm.mimi import loading
    from csm.voices import VOICE_TRANSCRIPTS, voice_file
    from csm.watermark.watermarker import WEIGHTS_FOLDER

    packages = ("csm", "torch", "numpy", "safetensors", "huggingface_hub", "tokenizers", "soundfile", "soxr")
    print("versions: " + ", ".join(f"{name} {version(name)}" for name in packages))
    device = _device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    print(f"device: {device}, CSM dtype: {str(dtype).removeprefix('torch.')} (Mimi and watermark: float32)")
    artifacts = [
        ("CSM weights", args.model, checkpoints.WEIGHT_FILES),
        ("text tokenizer", args.tokenizer or args.model, [text.TOKENIZER_FILE]),
        ("Mimi weights", args.mimi, loading.CANDIDATES),
        *[
            (f"watermark {name}", args.watermarker, [f"{WEIGHTS_FOLDER}/{name}", name])
            for name in ("enc_c.ckpt", "dec_c.ckpt", "dec_m_0.ckpt")
        ],
        *[(f"voice {name}", args.model, [voice_file(name)]) for name in VOICE_TRANSCRIPTS],
    ]
    for what, source, candidates in artifacts:
        found = cached_file(source, candidates)
        where = f"cached at {found}" if found else f"not cached (looks for {', '.join(candidates)})"
        print(f"{what}: {source}: {where}")
    return 0


# `csm bench`: everything of the command from here to `_load_generator`.


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure speed, memory and (with --quality) accuracy of each number format here",
        description="For each mode, load CSM, stream a fixed utterance after a short warm-up and report "
        "seconds per frame (80 ms of audio, Mimi decode included), the real-time factor, the time to the "
        "first 80 ms of audio, and memory; then print a table. With --quality, also score each mode's "
        "teacher-forced predictions against the unquantized --dtype model, with float32 as the noise floor.",
    )
    bench.add_argument(
        "--quantize",
        metavar="MODES",
        help="comma-separated modes to measure: fp32, bf16, fp16 (unquantized), int8, int4 (weight-only, "
        "bfloat16 activations) (default: the --dtype model, int8 and int4; a `csm quantize` folder: its format)",
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="also run each mode with its frame step compiled by torch.compile (the warm-up includes the compilation)",
    )
    bench.add_argument(
        "--frames", type=int, default=25, metavar="N", help="timed frames per mode (default 25: 2 s of audio)"
    )
    bench.add_argument(
        "--quality",
        action="store_true",
        help="also compare each mode's predictions with the reference's on a fixed prompt (the model's "
        "built-in voices, else synthetic audio): top-1 agreement and KL divergence per codebook",
    )
    bench.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    bench.add_argument(
        "--dtype",
        help="float32, bfloat16 or float16: the reference, and the default mode (default: best for the device)",
    )
    _add_sources(bench, watermarker=False)
    bench.set_defaults(run=_bench)


def _bench(args: argparse.Namespace) -> int:
    from csm import quality
    from csm.bench import WARMUP_FRAMES, Mode, benchmark, default_modes, parse_modes, teacher_forced, with_compiled
    from csm.checkpoints import open_checkpoint
    from csm.devices import default_dtype, parse_dtype
    from csm.mimi import Mimi
    from csm.text import load_tokenizer

    if args.frames < 2:
        raise ValueError(f"--frames must be at least 2, got {args.frames}")
    device = _device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    # Opened first (config and tensor names only), so that a wrong --model fails at once.
    quantized = open_checkpoint(args.model).quantization
    if quantized:
        modes = parse_modes(args.quantize or quantized)
        if args.quality or any(mode.quantize != quantized for mode in modes):
            raise ValueError(
                f"{args.model} holds {quantized} weights only: it runs as --quantize {quantized}, without "
                "--quality (which compares with the unquantized model); pass the original weights for more"
            )
    else:
        modes = parse_modes(args.quantize) if args.quantize else default_modes(dtype)
    if args.compile:
        modes = with_compiled(modes)
    tokenizer = load_tokenizer(args.tokenizer, model_source=args.model)
    mimi = Mimi.from_pretrained(args.mimi, device=device, dtype=torch.float32, num_codebooks=32)
    sequence, source, scored, scored_only = None, "", [], []
    if args.quality:
        segments, source = quality.prompt_segments(args.model)
        sequence = quality.teacher_forcing_sequence(tokenizer, mimi, segments)
        # Compiling changes no number format: a compiled twin predicts what its eager mode does.
        scored = [mode for mode in modes if not mode.compile]
        # The reference and the noise floor are scored even when their speed is not asked for.
        measured = {mode.format for mode in modes}
        scored_only = [
            Mode(each) for each in dict.fromkeys([dtype, torch.float32]) if Mode(each).format not in measured
        ]
    scored_frames = 0 if sequence is None else len(sequence.scored)
    total = len(modes) * (WARMUP_FRAMES + args.frames) + (len(scored) + len(scored_only)) * scored_frames
    results, logits = [], {}
    with tqdm(total=total, desc="bench", unit="frame", file=sys.stderr) as bar:
        for mode in modes:
            result = benchmark(
                mode,
                model=args.model,
                mimi=mimi,
                tokenizer=tokenizer,
                device=device,
                frames=args.frames,
                sequence=sequence if mode in scored else None,
                progress=bar,
            )
            results.append(result)
            if result.logits is not None:
                logits[mode.format] = result.logits
        for mode in scored_only:
            logits[mode.format] = teacher_forced(mode, model=args.model, device=device, sequence=sequence, progress=bar)
    print(f"csm bench: {args.model} on {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    headers = ["mode", "load s", "warm-up s", "first audio s", "s/frame", "real-time factor", "resident GB", "peak GB"]
    rows = [
        [
            result.mode.name,
            f"{result.load_seconds:.1f}",
            f"{result.warmup_seconds:.2f}",
            f"{result.first_audio_seconds:.3f}",
            f"{result.seconds_per_frame:.3f}",
            f"{result.real_time_factor:.2f}",
            _gigabytes(result.resident_bytes),
            _gigabytes(result.peak_bytes),
        ]
        for result in results
    ]
    _print_table(headers, rows)
    if sequence is not None:
        _print_quality(logits, Mode(dtype).format, len(sequence.scored), source)
    return 0


def _print_quality(logits: dict, reference: str, frames: int, source: str) -> None:
    from csm.quality import compare

    compared = {name: compare(logits[reference], values) for name, values in logits.items() if name != reference}
    if not compared:
        print(f"\nquality: only the reference ({reference}) was run; name other modes to compare with it")
        return
    floor = "; fp32 is the noise floor" if "fp32" in compared else ""
    print(f"\nquality against {reference}, teacher-forced on {frames} frames of {source}{floor}:")
    headers = ["mode", "top-1 codebook 0", "top-1 codebooks 1-31", "worst codebook", "mean KL (nats)"]
    rows = [
        [
            name,
            f"{agreement.top1_backbone:.1%}",
            f"{agreement.top1_depth:.1%}",
            f"{float(agreement.top1.min()):.1%} ({int(agreement.top1.argmin())})",
            f"{agreement.kl_mean:.2e}",
        ]
        for name, agreement in compared.items()
    ]
    _print_table(headers, rows)
    print("\nper codebook: top-1 agreement / mean KL (nats)")
    rows = [
        [str(codebook), *(f"{float(a.top1[codebook]):.1%} / {float(a.kl[codebook]):.1e}" for a in compared.values())]
        for codebook in range(next(iter(compared.values())).top1.numel())
    ]
    _print_table(["codebook", *compared], rows)


def _gigabytes(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 1e9:.2f}"


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A Markdown table, columns padded to line up in a terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for line in [headers, ["-" * width for width in widths], *rows]:
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |")


def _load_generator(args: argparse.Namespace):
    from csm.devices import default_dtype, parse_dtype
    from csm.generator import load_csm_1b

    if args.max_seconds <= 0:
        raise ValueError(f"--max-seconds must be positive, got {args.max_seconds:g}")
    device = _device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    watermark = False if args.no_watermark else (args.watermark_key or True)
    if args.compile:
        print(
            "csm: note: --compile: the first frame waits for the compiler (a minute or more on a CPU)", file=sys.stderr
        )
    return load_csm_1b(
        device,
        dtype=dtype,
        model=args.model,
        mimi=args.mimi,
        tokenizer=args.tokenizer,
        watermark=watermark,
        watermarker=args.watermarker,
        quantize=args.quantize,
        compile=args.compile,
        adapter=args.adapter,
    )


# --- fine-tuning: `csm finetune` and `csm merge` -------------------------------------------


def _add_finetune_commands(commands) -> None:
    from csm.finetune.lora import DEFAULT_TARGETS, HEAD_TARGETS, LAYER_TARGETS
    from csm.finetune.merge import LAYOUTS

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune CSM on your own recordings (LoRA or full)",
        description="Fine-tune CSM on DATA: a JSONL manifest, one conversation per line "
        '({"segments": [{"audio": "a.wav", "text": "...", "speaker": 0, "train": true}, ...]}, paths '
        "relative to the manifest), or a folder of audio files each with a .txt transcript beside it. "
        "LoRA runs write a PEFT adapter into OUT (use it with csm say --adapter OUT), full runs a "
        "checkpoint (csm say --model OUT). Quantized (QLoRA) training is not supported.",
    )
    finetune.add_argument("data", type=Path, help="training data: a JSONL manifest or a folder of clips")
    finetune.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        metavar="OUT",
        help="folder for the result, log, samples and checkpoints",
    )
    for name, default, help_text in (
        ("--model", "sesame/csm-1b", "CSM weights to start from: hub repo, folder or file"),
        ("--mimi", "kyutai/moshiko-pytorch-bf16", "Mimi codec weights: hub repo, folder or file"),
        ("--tokenizer", None, "text tokenizer: hub repo, folder or tokenizer.json (default: the model's)"),
        ("--watermarker", "sony/silentcipher", "watermark weights, for the eval samples"),
    ):
        finetune.add_argument(name, default=default, metavar="SOURCE", help=help_text)
    finetune.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    finetune.add_argument("--dtype", help="dtype of the frozen weights (default float32; bfloat16 for LoRA on CUDA)")
    finetune.add_argument("--lora-rank", type=int, default=16, metavar="R", help="LoRA rank (default 16)")
    finetune.add_argument("--lora-alpha", type=float, metavar="A", help="LoRA alpha (default 2 x rank)")
    finetune.add_argument("--full", action="store_true", help="train every weight instead of a LoRA adapter")
    finetune.add_argument(
        "--targets",
        type=lambda text: tuple(text.split(",")),
        default=DEFAULT_TARGETS,
        metavar="NAMES",
        help=f"comma-separated LoRA targets in both the backbone and the depth decoder (default {','.join(DEFAULT_TARGETS)}; "
        f"known: {','.join(LAYER_TARGETS + HEAD_TARGETS)})",
    )
    finetune.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 for LoRA, 2e-5 with --full)")
    finetune.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    finetune.add_argument("--steps", type=int, help="optimizer steps to run instead of --epochs")
    finetune.add_argument(
        "--batch-frames",
        type=int,
        default=2048,
        metavar="N",
        help="positions per batch, padding included (default 2048)",
    )
    finetune.add_argument(
        "--grad-accum", type=int, default=1, metavar="N", help="batches per optimizer step (default 1)"
    )
    finetune.add_argument(
        "--warmup",
        type=int,
        default=10,
        metavar="STEPS",
        help="linear warm-up steps before the cosine decay (default 10)",
    )
    finetune.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    finetune.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1)")
    finetune.add_argument(
        "--decoder-frame-ratio",
        type=float,
        default=1 / 16,
        metavar="R",
        help="share of each sequence's frames the depth decoder learns from (default 1/16; at least one, end of audio always)",
    )
    finetune.add_argument(
        "--c0-weight", type=float, default=1.0, help="weight of the backbone (codebook 0) term (default 1)"
    )
    finetune.add_argument(
        "--decoder-weight", type=float, default=1.0, help="weight of the depth-decoder term (default 1)"
    )
    finetune.add_argument(
        "--seed", type=int, default=0, help="seed of the data order, LoRA init and frame choice (default 0)"
    )
    finetune.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="a broken data entry fails the run (default) or is skipped with a message",
    )
    finetune.add_argument(
        "--cache-dir", type=Path, metavar="DIR", help="where Mimi codes are cached (default ~/.cache/csm/codes)"
    )
    evaluation = finetune.add_mutually_exclusive_group()
    evaluation.add_argument("--eval", type=Path, metavar="DATA", help="evaluation data, in either form")
    evaluation.add_argument(
        "--eval-split", type=float, metavar="F", help="hold out this share of the conversations for evaluation"
    )
    finetune.add_argument(
        "--eval-every", type=int, metavar="STEPS", help="evaluate every STEPS steps (always at the end)"
    )
    finetune.add_argument(
        "--save-every", type=int, metavar="STEPS", help="save a resumable checkpoint every STEPS steps"
    )
    finetune.add_argument(
        "--samples",
        type=int,
        default=4,
        metavar="N",
        help="eval prompts spoken into OUT/samples at each eval (default 4)",
    )
    finetune.add_argument(
        "--sample-seconds", type=float, default=10.0, metavar="S", help="length limit of each sample (default 10)"
    )
    finetune.add_argument(
        "--resume", type=Path, metavar="CHECKPOINT", help="continue exactly from OUT/checkpoint of an earlier run"
    )
    finetune.set_defaults(run=_finetune)

    merge = commands.add_parser(
        "merge",
        help="merge a LoRA adapter into a full checkpoint",
        description="Write MODEL with ADAPTER merged into OUT: original layout (model.safetensors + config.json, "
        "for csm), or transformers' CsmForConditionalGeneration layout.",
    )
    merge.add_argument("model", metavar="MODEL", help="CSM weights: hub repo, folder or file")
    merge.add_argument("adapter", metavar="ADAPTER", help="LoRA adapter (PEFT format): hub repo, folder or file")
    merge.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="folder to write")
    merge.add_argument("--layout", choices=LAYOUTS, default="original", help="checkpoint layout (default original)")
    merge.add_argument(
        "--codec",
        default="kyutai/mimi",
        metavar="SOURCE",
        help="with --layout transformers and a MODEL without a bundled codec: Mimi in the kyutai/mimi layout",
    )
    merge.set_defaults(run=_merge)


def _finetune(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from csm.finetune import FinetuneOptions
    from csm.finetune.train import run

    run(FinetuneOptions(**{field.name: getattr(args, field.name) for field in fields(FinetuneOptions)}))
    print(f"csm: fine-tuned into {args.output}", file=sys.stderr)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from csm.finetune.merge import merge

    written = merge(args.model, args.adapter, args.output, layout=args.layout, codec=args.codec)
    print(f"csm: wrote {written}", file=sys.stderr)
    return 0


def _device(name: str | None) -> torch.device:
    from csm.devices import default_device, parse_device

    return parse_device(name) if name else default_device()


def _read_text(text: str) -> str:
    if text == "-":
        if sys.stdin.isatty():
            raise ValueError("no text given: pass it as an argument or pipe it on stdin")
        text = sys.stdin.read()
    if not text.strip():
        raise ValueError("the text to say is empty")
    return text


def _check_output(output: str) -> None:
    from csm.audio import check_writable

    if output != "-":
        check_writable(output)


def _read_script(path: Path):
    if not path.is_file():
        raise ValueError(f"script {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _script_turns(script, path: Path) -> list:
    from csm.longform import Turn

    if not isinstance(script, dict) or not isinstance(script.get("turns"), list) or not script["turns"]:
        raise ValueError(f'{path}: expected an object with a non-empty list "turns"')
    turns = []
    for index, turn in enumerate(script["turns"]):
        where = f"{path}: turns[{index}]"
        if not isinstance(turn, dict):
            raise ValueError(f'{where} must be an object with "speaker" and "text"')
        speaker, text = turn.get("speaker"), turn.get("text")
        if not isinstance(speaker, int) or isinstance(speaker, bool) or speaker < 0:
            raise ValueError(f"{where}.speaker must be a non-negative integer, got {speaker!r}")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}.text must be a non-empty string, got {text!r}")
        turns.append(Turn(speaker, text))
    return turns


def _script_prompts(script: dict, path: Path, model: str) -> list:
    from csm.audio import load_audio
    from csm.generator import Segment
    from csm.voices import load_voice

    prompts = script.get("prompts", {})
    if not isinstance(prompts, dict):
        raise ValueError(f'{path}: "prompts" must map speaker ids to prompts')
    segments = []
    for name, prompt in prompts.items():
        where = f"{path}: prompts[{name!r}]"
        if not name.isdigit():
            raise ValueError(f"{where}: speaker ids must be non-negative integers")
        speaker = int(name)
        if isinstance(prompt, str):
            segments.append(load_voice(prompt, speaker, model))
        elif isinstance(prompt, dict) and isinstance(prompt.get("audio"), str) and isinstance(prompt.get("text"), str):
            audio = load_audio(path.parent / prompt["audio"], SAMPLE_RATE)
            segments.append(Segment(speaker=speaker, text=prompt["text"], audio=audio))
        else:
            raise ValueError(f'{where} must be a voice name or {{"audio": FILE, "text": TRANSCRIPT}}')
    return segments
