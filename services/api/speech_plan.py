"""From an HTTP speech body to the mesh's ``SpeechRequest``: OpenAI's validation, with
the parameter named in every 400. The counterpart of ``generation_plan`` for speech.

The limits (input length, speed, sample rate) are shared/protocol/speech.py's, the
same the tts replicas apply; voices and models are checked against the replicas'
catalogs by the gateway.
"""

from __future__ import annotations

import uuid

from services.api.audio import FORMATS, RESPONSE_FORMATS
from services.api.errors import ApiError, bad_request
from services.api.openai_schema import SpeechBody
from shared.protocol.speech import (
    MAX_INPUT_CHARS,
    SpeechRequest,
    sample_rate_problem,
    speed_problem,
)

STREAM_FORMATS = ("audio", "sse")


def _invalid(message: str, param: str) -> ApiError:
    # Speech's 400s carry OpenAI's error type as their code, as they always have.
    return bad_request(message, param, code="invalid_request_error")


def check_speech_body(body: SpeechBody) -> SpeechBody:
    """``body`` if OpenAI (and meshserve's extensions) accept it; else a 400."""
    if not body.input.strip():
        raise _invalid("input is empty", "input")
    if len(body.input) > MAX_INPUT_CHARS:
        raise _invalid(f"input is longer than {MAX_INPUT_CHARS} characters", "input")
    audio_format = FORMATS.get(body.response_format)
    if audio_format is None:
        raise _invalid(f"response_format {body.response_format!r} is not supported; "
                       f"use one of {', '.join(RESPONSE_FORMATS)}", "response_format")
    if body.stream_format not in STREAM_FORMATS:
        raise _invalid(f"stream_format must be 'audio' or 'sse', got {body.stream_format!r}",
                       "stream_format")
    if (problem := speed_problem(body.speed)) is not None:
        raise _invalid(problem, "speed")
    if (problem := sample_rate_problem(body.sample_rate)) is not None:
        raise _invalid(problem, "sample_rate")
    # mp3, opus and aac encode a fixed set of rates; the mesh makes the one asked for.
    if (problem := audio_format.sample_rate_problem(body.sample_rate)) is not None:
        raise _invalid(problem, "sample_rate")
    return body


def plan_speech(body: SpeechBody) -> SpeechRequest:
    """The mesh request for a checked body, under a fresh request id."""
    return SpeechRequest(
        request_id=f"speech-{uuid.uuid4().hex}",
        input=body.input,
        voice=body.voice_name,
        speed=body.speed,
        sample_rate=body.sample_rate,
        model=body.model,
        instructions=body.instructions,
    )
