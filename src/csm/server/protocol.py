"""The request and response bodies of the API, as OpenAI defines them, plus csm's extras."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from csm.sampling import TEMPERATURE_RANGE

MAX_INPUT_CHARS = 4096
MAX_CONTEXT_TURNS = 8

ResponseFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]


class VoiceRef(BaseModel):
    """A voice given as an object, `{"id": "voice_..."}`, as newer OpenAI clients send it."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)


class ContextTurn(BaseModel):
    """An earlier turn of the conversation: its audio (base64 of an audio file), text and speaker."""

    model_config = ConfigDict(extra="forbid")
    audio: str = Field(min_length=1)
    text: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    speaker: int = Field(0, ge=0)


class SpeechRequest(BaseModel):
    """`POST /v1/audio/speech`. Fields past `instructions` are csm's (the client's `extra_body`)."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    voice: str | VoiceRef
    response_format: ResponseFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    # Accepted for compatibility; CSM has no way to follow style instructions.
    instructions: str | None = Field(None, max_length=MAX_INPUT_CHARS)
    seed: int | None = Field(None, ge=0, lt=2**63)
    temperature: float = Field(0.9, ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])
    topk: int = Field(50, ge=1, le=2048)
    max_audio_seconds: float = Field(30.0, gt=0, le=90)
    context: list[ContextTurn] = Field(default_factory=list, max_length=MAX_CONTEXT_TURNS)
    # False: the whole clip is made first, marked as one clip, and sent with its duration headers.
    stream: bool = True

    @field_validator("input")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("input must contain some text")
        return text

    @property
    def voice_id(self) -> str:
        return self.voice if isinstance(self.voice, str) else self.voice.id


class Voice(BaseModel):
    """A voice as listed and returned by the voices endpoints."""

    id: str
    object: Literal["audio.voice"] = "audio.voice"
    name: str
    created_at: int
    kind: Literal["builtin", "openai", "stored"]
    description: str = ""


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Voice]


class DeletedVoice(BaseModel):
    id: str
    object: Literal["audio.voice.deleted"] = "audio.voice.deleted"
    deleted: bool = True


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sesame"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
