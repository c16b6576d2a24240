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
    watermark_commands = watermark.add_subparsers(title="commands", required=True, metavar="COMMAND", parser_class=_Parser)
    check = watermark_commands.add_parser(
        "check",
        help="say whether audio files carry the watermark",
        description="Print 'Watermarked' or 'Not watermarked' for each FILE. "
        "Exit status 0 when all are watermarked, 1 when any is not, 2 on errors.",
    )
    check.add_argument("files", nargs="+", type=Path, metavar="FILE", help="audio files (wav, flac, ogg, ...)")
    check.add_argument("--watermarker", default="sony/silentcipher", metavar="SOURCE", help="watermark weights: hub repo, folder or file")
    check.add_argument("--watermark-key", type=_key, default=None, metavar="K1,...,K5", help="the 5-byte key (default: CSM's public key)")
    check.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    check.set_defaults(run=_check)

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
    return parser


def _add_output(command: argparse.ArgumentParser, batch: str = "") -> None:
    command.add_argument(
        "-o", "--output", required=True, metavar="PATH",
        help=f"audio file to write (.wav, .flac or .ogg), or '-' for raw 16-bit 24 kHz mono PCM on stdout{batch}",
    )


def _add_sources(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", default="sesame/csm-1b", metavar="SOURCE", help="CSM weights: hub repo, folder or file")
    command.add_argument("--mimi", default="kyutai/moshiko-pytorch-bf16", metavar="SOURCE", help="Mimi codec weights: hub repo, folder or file")
    command.add_argument("--tokenizer", metavar="SOURCE", help="text tokenizer: hub repo, folder or tokenizer.json (default: the model's)")
    command.add_argument("--watermarker", default="sony/silentcipher", metavar="SOURCE", help="watermark weights: hub repo, folder or file")


def _add_generation(command: argparse.ArgumentParser, default_seconds: float) -> None:
    command.add_argument("--seed", type=int, help="random seed, for reproducible output")
    command.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (default 0.9)")
    command.add_argument("--topk", type=int, default=50, help="sample among the K most likely codes (default 50)")
    command.add_argument(
        "--max-seconds", type=float, default=default_seconds, metavar="S",
        help=f"longest audio per chunk or turn, in seconds (default {default_seconds:g})",
    )
    command.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    command.add_argument("--dtype", help="CSM number format: float32, bfloat16 or float16 (default: best for the device)")
    _add_sources(command)
    command.add_argument("--no-watermark", action="store_true", help="do not watermark the output")
    command.add_argument("--watermark-key", type=_key, default=None, metavar="K1,...,K5", help="your own 5-byte watermark key")


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
        "--max-batch", type=_positive, default=8, metavar="N", help="with --batch: utterances generated together (default 8)"
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
            raise ValueError(f"{where}: unknown voice {entry['voice']!r}: built-in voices are {', '.join(VOICE_TRANSCRIPTS)}")
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


def _load_generator(args: argparse.Namespace):
    from csm.devices import default_dtype, parse_dtype
    from csm.generator import load_csm_1b

    if args.max_seconds <= 0:
        raise ValueError(f"--max-seconds must be positive, got {args.max_seconds:g}")
    device = _device(args.device)
    dtype = parse_dtype(args.dtype) if args.dtype else default_dtype(device)
    watermark = False if args.no_watermark else (args.watermark_key or True)
    return load_csm_1b(
        device,
        dtype=dtype,
        model=args.model,
        mimi=args.mimi,
        tokenizer=args.tokenizer,
        watermark=watermark,
        watermarker=args.watermarker,
    )


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
        raise ValueError(f"{path}: expected an object with a non-empty list \"turns\"")
    turns = []
    for index, turn in enumerate(script["turns"]):
        where = f"{path}: turns[{index}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} must be an object with \"speaker\" and \"text\"")
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
        raise ValueError(f"{path}: \"prompts\" must map speaker ids to prompts")
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
            raise ValueError(f"{where} must be a voice name or {{\"audio\": FILE, \"text\": TRANSCRIPT}}")
    return segments
