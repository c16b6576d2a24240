"""`csm say` and `csm converse`: text or a JSON script spoken into one audio file."""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from csm.cli.batch import add_batch, say_batch
from csm.cli.options import SAMPLE_RATE, add_generation, load_generator


def add_commands(commands) -> None:
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
    add_batch(say)
    add_generation(say, default_seconds=30.0)
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
    add_generation(converse, default_seconds=10.0)
    converse.set_defaults(run=_converse, stream=False)


def _add_output(command: argparse.ArgumentParser, batch: str = "") -> None:
    command.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="PATH",
        help=f"audio file to write (.wav, .flac or .ogg), or '-' for raw 16-bit 24 kHz mono PCM on stdout{batch}",
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


def _voice_names() -> list[str]:
    from csm.voices import VOICE_TRANSCRIPTS

    return sorted(VOICE_TRANSCRIPTS)


def _say(args: argparse.Namespace) -> int:
    from csm.audio import load_audio
    from csm.generator import Segment
    from csm.longform import Turn, split_sentences
    from csm.voices import load_voice

    if args.batch is not None:
        return say_batch(args)
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
    return _render(load_generator(args), turns, prompts, args)


def _converse(args: argparse.Namespace) -> int:
    _check_output(args.output)
    script = _read_script(args.script)
    turns = _script_turns(script, args.script)
    prompts = _script_prompts(script, args.script, args.model)
    return _render(load_generator(args), turns, prompts, args)


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
            raise ValueError(f'{where} must be an object with "speaker" and "text"')  # noqa: TRY004 -- a user error: one line, exit 2
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
        raise ValueError(f'{path}: "prompts" must map speaker ids to prompts')  # noqa: TRY004 -- a user error: one line, exit 2
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
            raise ValueError(f'{where} must be a voice name or {{"audio": FILE, "text": TRANSCRIPT}}')  # noqa: TRY004 -- a user error: one line, exit 2
    return segments
