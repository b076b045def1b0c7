"""What a speech engine is to a tts replica, and how a second kind of engine fits.

Two layers, so that engines as different as espeak-ng and a speech-token LLM fit:

``Engine`` is a synthesizer that runs *inside one engine process*, one job at a time:
``synthesize(text, voice, speed, sink)`` calls ``sink(pcm)`` with audio as it is made
and stops as soon as ``sink`` returns False (that is how a cancel frees the engine
mid-chunk). espeak-ng is one (its C library has global state, hence one synthesis per
process and more processes to scale); a Piper/ONNX or a torch vocoder engine would
be another, unchanged.

``EngineBackend`` is what the replica's actor drives: ``slots`` that each run one
``EngineSynthesize`` job at a time and answer with ``EngineAudio`` events (the last
one ``final``), plus cancel and a hard restart. ``EngineProcessPool`` implements it
with one engine process per slot, each running an ``Engine``.

A speech-token engine (an LLM that emits audio codec tokens) implements
``EngineBackend`` instead of ``Engine``, because its heavy part runs on the text
path's workers, not in the tts replica:

- ``start_job`` turns the chunk into a prompt (voice/speaker tokens + text in the
  model's format) and sends a ``Submit`` to the scheduler over its own DealerEndpoint,
  exactly as a tokenizer replica does; a slot is then one in-flight sequence, so the
  backend's ``slots`` bounds how many chunks this replica keeps in the batch.
- The scheduler's ``TokenBatch`` carries codec token ids back; a codec-decoder
  process (SNAC/Mimi/EnCodec in torch, one per slot or batched) turns each frame
  group into PCM and the backend emits it as ``EngineAudio`` pieces, ``final`` with
  the sequence's finish.
- ``cancel_job`` sends ``Abort`` to the scheduler (which frees the KV at once) and
  drops the decoder state; the backend answers with a ``final`` ``EngineAudio``
  marked ``cancelled``, as an engine process does.

The ``TtsScheduler`` (chunking, first-chunk priority, bounded admission, ordering,
cancellation bookkeeping) and the api side stay as they are for both.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from shared.protocol.speech import EngineAudio, EngineReady, EngineSynthesize, SpeechVoice

AudioSink = Callable[[bytes], bool]
"""Receives s16le mono PCM at the engine's native rate; returns False to abort."""


class EngineError(RuntimeError):
    """A synthesis failed for a reason the client should hear about (HTTP 500)."""


class Engine(Protocol):
    """A synthesizer for one engine process; never called from two threads."""

    name: str
    sample_rate: int

    def load(self) -> None:
        """Load the library, data and voices; raises if the engine cannot run here."""

    def models(self) -> list[str]:
        """Model names clients may ask for (the first is the engine's own name)."""

    def voices(self) -> list[SpeechVoice]:
        """Every voice ``synthesize`` accepts, by ``SpeechVoice.name``."""

    def synthesize(self, text: str, voice: str, speed: float, sink: AudioSink) -> bool:
        """Speak ``text``, feeding ``sink``; True when it ran to the end, False when
        ``sink`` aborted it. Raises ``EngineError`` when synthesis fails."""

    def close(self) -> None:
        """Release the engine (idempotent)."""


# Engines by the name `MESHSERVE_ENGINE` selects; imported lazily in the engine process.
ENGINES: dict[str, str] = {
    "espeak-ng": "services.tts.engines.espeak:EspeakEngine",
}


def load_engine(name: str) -> Engine:
    """A fresh, not yet loaded, engine called ``name``."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise ValueError(f"unknown tts engine {name!r}; known: {sorted(ENGINES)}") from None
    module_name, _, class_name = target.partition(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    engine: Engine = engine_class()
    return engine


# ------------------------------------------------------------- the actor's side


@dataclass(frozen=True, slots=True)
class SlotReady:
    """A slot's engine is up (again) and offers ``info``."""

    slot: int
    info: EngineReady


@dataclass(frozen=True, slots=True)
class SlotAudio:
    """Audio of the job running in ``slot``."""

    slot: int
    audio: EngineAudio


@dataclass(frozen=True, slots=True)
class SlotLost:
    """A slot's engine died or was killed, and with it its running job (if any).
    A ``SlotReady`` follows once it is back."""

    slot: int
    reason: str


BackendEvent = SlotReady | SlotAudio | SlotLost


class EngineBackend(Protocol):
    """Slots that synthesize one job each, reporting through ``BackendEvent``s."""

    slots: int
    restarts: int  # engines lost so far

    async def run(
        self,
        events: anyio.abc.ObjectSendStream[BackendEvent],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Bring the slots up and keep them up until cancelled; ``started()`` once
        every slot is being started (readiness comes as ``SlotReady`` events)."""

    async def start_job(self, slot: int, job: EngineSynthesize) -> None:
        """Run ``job`` in ``slot``, which must be ready and idle."""

    async def cancel_job(self, slot: int, job_id: int) -> None:
        """Ask ``slot`` to abort ``job_id``; its final ``EngineAudio`` still comes."""

    def restart(self, slot: int, reason: str) -> None:
        """Kill ``slot``'s engine (it answers with ``SlotLost``, then ``SlotReady``)."""

    def pids(self) -> list[int]:
        """Process ids behind the slots, for status and tests (may be empty)."""
