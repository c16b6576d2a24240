"""Built-in voices: the prompt recordings published in the model repo, with their transcripts.

CSM has no fixed speakers; a voice is a context segment (audio + what is said in it) placed
before the text to generate. The model repo ships two such recordings in `prompts/`.
"""

from __future__ import annotations

import os
from pathlib import Path

from csm.audio import load_audio
from csm.generator import Segment
from csm.hub import resolve_file

# The transcripts of the model repo's prompts/<name>.wav, as the reference's example uses them.
VOICE_TRANSCRIPTS = {
    "conversational_a": (
        "like revising for an exam I'd have to try and like keep up the momentum because I'd "
        "start really early I'd be like okay I'm gonna start revising now and then like "
        "you're revising for ages and then I just like start losing steam I didn't do that "
        "for the exam we had recently to be fair that was a more of a last minute scenario "
        "but like yeah I'm trying to like yeah I noticed this yesterday that like Mondays I "
        "sort of start the day with this not like a panic but like a"
    ),
    "conversational_b": (
        "like a super Mario level. Like it's very like high detail. And like, once you get "
        "into the park, it just like, everything looks like a computer game and they have all "
        "these, like, you know, if, if there's like a, you know, like in a Mario game, they "
        "will have like a question block. And if you like, you know, punch it, a coin will "
        "come out. So like everyone, when they come into the park, they get like this little "
        "bracelet and then you can go punching question blocks around."
    ),
}


def voice_file(name: str) -> str:
    """The path of voice `name`'s recording inside the model repo."""
    if name not in VOICE_TRANSCRIPTS:
        raise ValueError(f"unknown voice {name!r}: built-in voices are {', '.join(VOICE_TRANSCRIPTS)}")
    return f"prompts/{name}.wav"


def load_voice(
    name: str, speaker: int, model: str | os.PathLike = "sesame/csm-1b", *, revision: str | None = None
) -> Segment:
    """Voice `name` as a context `Segment` for `speaker`, its audio read from the model repo.

    `model` is the model's hub repo or local folder; for a local checkpoint file, the
    folder it lies in.
    """
    filename = voice_file(name)
    source = Path(model).expanduser().parent if Path(model).expanduser().is_file() else model
    audio = load_audio(resolve_file(source, [filename], revision=revision))
    return Segment(speaker=speaker, text=VOICE_TRANSCRIPTS[name], audio=audio)
