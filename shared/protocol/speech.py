"""Speech: api <-> tts replicas, and a tts replica <-> its engine processes.

api <-> tts (the api binds a ROUTER at ``MESHSERVE_SPEECH_ADDR``; tts replicas connect
DEALERs and say ``Hello`` with ``capacity`` = engine processes, ``ready`` once their
engines are up)::

    api ──SpeechRequest──▶ tts        tts ──SpeechCatalog──▶ api   (on every join)
    api ──SpeechCancel───▶ tts        tts ──SpeechChunk*───▶ api   (last one final)
    api ──SpeechStatusRequest─▶ tts   tts ──SpeechFailed───▶ api   (instead of final)
    api ──SpeechCatalogRequest▶ tts   tts ──SpeechStatus───▶ api

Ownership: the api holds every request until it ends, and the client's position in
it (samples delivered). A tts replica that dies loses nothing the api cannot redo: the
api re-sends the ``SpeechRequest`` to another replica and drops the samples it already
delivered, using ``SpeechChunk.sample_offset`` (synthesis repeats itself, espeak-ng to
within a few samples, so the seam is inaudible). A cancelled request gets no answer.

Audio is always signed 16-bit little-endian mono PCM in ``bytes`` (never a list of
ints); ``sample_rate`` travels with every chunk.

The engine-process messages (``Engine*``) travel over a ZMQ PAIR inside one tts
replica as bare msgpack frames without an envelope: that pipe is private to the
replica, carries no trace context (the replica's actor records the spans), and both
ends are always the same build.

Schema evolution (as for every protocol module): new fields get defaults and go last;
fields are never reordered or reused; a breaking change bumps ``PROTOCOL_VERSION``.
"""

from __future__ import annotations

import math

import msgspec

# ------------------------------------------------------------------- limits
# One definition for both sides: the api checks HTTP bodies against them (with the
# parameter named), a tts replica checks every SpeechRequest again (it may be driven by
# something other than the api).

MAX_INPUT_CHARS = 4096  # OpenAI's limit on ``input``, what the api accepts
MIN_SPEED, MAX_SPEED = 0.25, 4.0  # OpenAI's range of ``speed``
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000  # what ``sample_rate`` may ask for


def speed_problem(speed: float) -> str | None:
    """Why ``speed`` is out of range, or None (NaN is out of range)."""
    if MIN_SPEED <= speed <= MAX_SPEED and not math.isnan(speed):
        return None
    return f"speed must be within {MIN_SPEED} and {MAX_SPEED}"


def sample_rate_problem(sample_rate: int) -> str | None:
    """Why ``sample_rate`` is out of range, or None."""
    if MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        return None
    return f"sample_rate must be within {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE}"


# ---------------------------------------------------------------- api <-> tts


class SpeechRequest(msgspec.Struct, frozen=True, tag=True):
    """api -> tts: synthesize ``input`` and stream it back as ``SpeechChunk``s.

    Re-sending the same ``request_id`` to a replica that already has it is ignored,
    so a retry is always safe. ``speed`` is OpenAI's 0.25..4.0 multiplier;
    ``sample_rate`` 0 means the engine's native rate (espeak-ng: 22050 Hz).
    ``model`` names the engine model as the catalog lists it ("" = the default).
    """

    request_id: str
    input: str
    voice: str
    speed: float = 1.0
    sample_rate: int = 0
    model: str = ""
    instructions: str = ""  # for engines that take a style prompt; espeak-ng ignores it


class SpeechCancel(msgspec.Struct, frozen=True, tag=True):
    """api -> tts: stop these requests, queued or running, and free their engines.

    Idempotent; ids the replica does not know are remembered for a while, so a cancel
    that overtakes its request (e.g. after a re-route) still wins."""

    request_ids: list[str]
    reason: str = "cancelled"


class SpeechChunk(msgspec.Struct, frozen=True, tag=True, gc=False):
    """tts -> api: the next piece of a request's audio, in order.

    ``seq`` counts a request's chunks from 0 on one replica; ``sample_offset`` is how
    many samples of this request came before ``pcm``: the api skips what it already
    delivered, so a request replayed on another replica never repeats audio.
    ``pcm`` may be empty on the ``final`` chunk.
    """

    request_id: str
    seq: int
    pcm: bytes  # s16le mono
    sample_rate: int
    final: bool
    sample_offset: int = 0


class SpeechFailed(msgspec.Struct, frozen=True, tag=True):
    """tts -> api: the request ended in an error the client must see (HTTP ``status``).

    ``code`` is OpenAI-style: ``invalid_request_error`` (400), ``server_busy`` (429,
    the replica's queue is full: the api may try another replica), ``engine_error``
    (500)."""

    request_id: str
    status: int
    code: str
    message: str


class SpeechVoice(msgspec.Struct, frozen=True):
    """One voice a replica can speak with, as ``GET /v1/audio/voices`` lists it."""

    name: str  # what clients pass as ``voice``
    language: str  # BCP 47-ish, e.g. "en-us"
    description: str = ""
    gender: str = ""  # "male" | "female" | ""


class SpeechCatalog(msgspec.Struct, frozen=True, tag=True):
    """tts -> api, once the replica's engines are up and again after every
    (re)connect: what it can synthesize. Requests for other voices or models are
    answered 400/404 by the api without a round trip."""

    engine: str  # e.g. "espeak-ng"
    sample_rate: int  # native rate of the engine
    models: list[str]
    voices: list[SpeechVoice]
    max_input_chars: int = 0  # 0: no limit beyond the api's own

    def has_voice(self, voice: str) -> bool:
        return any(v.name == voice for v in self.voices)

    def has_model(self, model: str) -> bool:
        """``model`` "" is the replica's default, which every replica has."""
        return not model or model in self.models

    def serves(self, request: SpeechRequest) -> bool:
        return self.has_voice(request.voice) and self.has_model(request.model)


class SpeechCatalogRequest(msgspec.Struct, frozen=True, tag=True):
    """api -> tts: send your ``SpeechCatalog`` (the api lost track of the replica,
    e.g. after reaping it for missed heartbeats, and it came back). A replica whose
    engines are not up yet answers once they are."""


class SpeechStatusRequest(msgspec.Struct, frozen=True, tag=True):
    """api -> tts: answer with a ``SpeechStatus``."""


class SpeechStatus(msgspec.Struct, frozen=True, tag=True):
    """tts -> api: the replica's load and lifetime counters (for /metrics, tests)."""

    engines: int
    engines_ready: int
    engines_busy: int
    requests: int  # admitted and not yet finished
    queued_chunks: int
    running_chunks: int
    completed: int
    cancelled: int
    cancelled_running: int  # running chunks stopped mid-synthesis
    busy_rejections: int
    engine_restarts: int
    engine_pids: list[int] = []


def request_problem(
    request: SpeechRequest, catalog: SpeechCatalog, max_input_chars: int
) -> str | None:
    """Why a replica offering ``catalog`` cannot serve ``request``, or None.

    ``max_input_chars`` is the replica's own cap (at least the api's
    ``MAX_INPUT_CHARS``); ``sample_rate`` 0 (the engine's native rate) is valid here.
    """
    if not request.request_id:
        return "request_id is empty"
    if not request.input.strip():
        return "input is empty"
    if len(request.input) > max_input_chars:
        return f"input is longer than {max_input_chars} characters"
    if not catalog.has_voice(request.voice):
        return f"unknown voice {request.voice!r}; GET /v1/audio/voices lists them"
    if not catalog.has_model(request.model):
        return f"unknown model {request.model!r}; known: {sorted(catalog.models)}"
    if (problem := speed_problem(request.speed)) is not None:
        return problem
    if request.sample_rate:
        return sample_rate_problem(request.sample_rate)
    return None


SpeechToTts = SpeechRequest | SpeechCancel | SpeechCatalogRequest | SpeechStatusRequest
SpeechFromTts = SpeechChunk | SpeechFailed | SpeechCatalog | SpeechStatus


# ---------------------------------------------------- tts actor <-> engine process


class EngineReady(msgspec.Struct, frozen=True, tag=True):
    """engine -> actor, once, after the engine loaded: what it offers."""

    engine: str
    sample_rate: int
    models: list[str]
    voices: list[SpeechVoice]
    pid: int


class EngineSynthesize(msgspec.Struct, frozen=True, tag=True):
    """actor -> engine: synthesize one text chunk. An engine runs one job at a time;
    the actor never sends another before the previous job's final ``EngineAudio``."""

    job_id: int
    text: str
    voice: str
    speed: float
    sample_rate: int  # 0: native
    piece_samples: int  # stream a piece whenever this many samples are ready


class EngineCancel(msgspec.Struct, frozen=True, tag=True):
    """actor -> engine: abort ``job_id`` if it is still running (checked by the
    engine between audio buffers, so it stops within milliseconds)."""

    job_id: int


class EngineAudio(msgspec.Struct, frozen=True, tag=True, gc=False):
    """engine -> actor: audio of the running job. The ``final`` one ends the job and
    frees the engine; it says whether the job was ``cancelled`` or failed (``error``)."""

    job_id: int
    pcm: bytes  # s16le mono at the job's rate
    final: bool
    cancelled: bool = False
    error: str | None = None


EngineCommand = EngineSynthesize | EngineCancel
EngineEvent = EngineReady | EngineAudio
