"""Speech end to end with the unmodified ``openai`` client: the real api service
(``python -m services.api``, whose speech gateway the tts replicas join) and real tts
replicas with espeak-ng engine processes, all subprocesses of the test. The text side
of the mesh is not started: speech does not go through it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from shutil import rmtree

import av
import httpx
import numpy as np
import openai
import pytest

HEARTBEAT_S = 0.1
REPO_ROOT = Path(__file__).resolve().parents[2]
LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog near the bank of the river, "
    "while the sun sets slowly behind the hills. " * 40
)[:4000]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        os.killpg(proc.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with suppress(ProcessLookupError):  # engines share their replica's group
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _env(ipc_dir: Path, **settings: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHSERVE_", "OTEL_"))}
    env.update(
        MESHSERVE_SPEECH_ADDR=f"ipc://{ipc_dir}/speech.sock",
        # The api also binds for tokenizers and dials the scheduler (none here: the
        # speech path does not use them).
        MESHSERVE_API_ADDR=f"ipc://{ipc_dir}/api.sock",
        MESHSERVE_SCHEDULER_ADDR=f"ipc://{ipc_dir}/scheduler.sock",
        MESHSERVE_KVCACHE_ADDR=f"ipc://{ipc_dir}/kvcache.sock",
        MESHSERVE_HEARTBEAT_S=str(HEARTBEAT_S),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    env.update({f"MESHSERVE_{k.upper()}": str(v) for k, v in settings.items()})
    return env


@dataclass
class LogLines:
    """JSON log lines of a process, read by a thread as they come."""

    lines: list[dict[str, object]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def follow(self, stream: io.BufferedReader) -> None:
        for raw in stream:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": raw.decode(errors="replace").rstrip()}
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for(self, event: str, timeout: float = 60.0, **fields: object) -> dict[str, object]:
        def found() -> dict[str, object] | None:
            return next((line for line in self.lines if line.get("event") == event
                         and all(line.get(k) == v for k, v in fields.items())), None)

        with self.changed:
            if not self.changed.wait_for(lambda: found() is not None, timeout):
                raise TimeoutError(f"no {event!r} log line within {timeout} s")
            line = found()
            assert line is not None
            return line

    def count(self, event: str) -> int:
        with self.changed:
            return sum(line.get("event") == event for line in self.lines)


@dataclass
class SpeechMesh:
    base_url: str
    api_log: LogLines
    replicas: dict[int, subprocess.Popen[bytes]]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics").text


@contextmanager
def speech_mesh(replicas: int = 1, engines: int = 2) -> Iterator[SpeechMesh]:
    ipc_dir = Path(tempfile.mkdtemp(prefix="ms-", dir="/tmp"))
    with ExitStack() as stack:
        stack.callback(rmtree, ipc_dir, ignore_errors=True)
        api = subprocess.Popen(
            [sys.executable, "-m", "services.api"], env=_env(ipc_dir, port=0),
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        api_log = LogLines()
        assert api.stdout is not None
        reader = threading.Thread(target=api_log.follow, args=(api.stdout,), daemon=True)
        reader.start()
        stack.callback(reader.join, 10)  # after the stop below: it reads until EOF
        stack.callback(_stop, api)
        procs = {}
        for replica in range(replicas):
            log = stack.enter_context(open(ipc_dir / f"tts-{replica}.log", "wb"))
            procs[replica] = subprocess.Popen(
                [sys.executable, "-m", "services.tts"],
                env=_env(ipc_dir, replica=replica, engines=engines),
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            stack.callback(_stop, procs[replica])
        port = api_log.wait_for("http listening")["port"]
        for replica in range(replicas):
            api_log.wait_for("tts replica ready", replica=f"tts/{replica}")
        yield SpeechMesh(f"http://127.0.0.1:{port}", api_log, procs)


@pytest.fixture(scope="module")
def mesh() -> Iterator[SpeechMesh]:
    with speech_mesh() as running:
        yield running


def read_wav(data: bytes) -> tuple[int, np.ndarray]:
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getcomptype()) == (1, 2, "NONE")
        rate = wav.getframerate()
    samples = np.frombuffer(data[44:], dtype="<i2")
    return rate, samples


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))


def test_create_returns_a_wav_whose_duration_grows_with_the_text(mesh: SpeechMesh) -> None:
    client = mesh.client()
    short = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello world.",
                                       response_format="wav")
    longer = client.audio.speech.create(
        model="tts-1", voice="alloy", response_format="wav",
        input="Hello world. This sentence makes the audio noticeably longer than before.",
    )
    rate, short_samples = read_wav(short.content)
    _, long_samples = read_wav(longer.content)
    assert rate == 24000
    assert short.content[:4] == b"RIFF" and short.content[8:16] == b"WAVEfmt "
    # Streamed like OpenAI's: the sizes are "unknown".
    assert short.content[4:8] == b"\xff\xff\xff\xff" and short.content[40:44] == b"\xff" * 4
    assert 0.5 < len(short_samples) / rate < 3.0
    assert len(long_samples) > 2.5 * len(short_samples)
    assert rms(short_samples) > 300 and rms(long_samples) > 300


def test_unstreamed_wav_has_exact_sizes_and_pcm_is_raw(mesh: SpeechMesh) -> None:
    client = mesh.client()
    whole = client.audio.speech.create(
        model="tts-1", voice="nova", input="Exact sizes, please.", response_format="wav",
        extra_body={"stream": False},
    ).content
    with wave.open(io.BytesIO(whole)) as wav:
        assert wav.getnframes() == (len(whole) - 44) // 2
    assert int.from_bytes(whole[4:8], "little") == len(whole) - 8
    pcm = client.audio.speech.create(
        model="tts-1", voice="nova", input="Exact sizes, please.", response_format="pcm"
    ).content
    assert abs(len(pcm) - (len(whole) - 44)) < 0.01 * len(pcm)  # same speech, no header


def test_streaming_delivers_audio_before_synthesis_of_the_whole_input_ends(
    mesh: SpeechMesh,
) -> None:
    client = mesh.client()
    started = time.monotonic()
    arrivals: list[tuple[float, int]] = []
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=LONG_TEXT, response_format="pcm", speed=0.25,
    ) as response:
        assert response.headers["content-type"].startswith("audio/pcm")
        for chunk in response.iter_bytes():
            arrivals.append((time.monotonic() - started, len(chunk)))
    first, last = arrivals[0][0], arrivals[-1][0]
    total = sum(size for _, size in arrivals)
    assert total / 2 / 24000 > 300  # minutes of speech at speed 0.25
    # The first audio came long before the last: synthesis was still running.
    assert first < last / 3, (first, last)
    assert sum(size for t, size in arrivals if t <= (first + last) / 2) < total


def test_sse_stream_has_audio_deltas_and_a_done_event(mesh: SpeechMesh) -> None:
    client = mesh.client()
    events = []
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="echo", input="Events, one by one. And a second sentence.",
        stream_format="sse", response_format="wav",
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done" and "usage" in events[-1]
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    rate, samples = read_wav(audio)
    assert rate == 24000 and rms(samples) > 300


FORMATS_TEXT = "Every format decodes. To the same length, streamed or not."
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
               "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}
CONTAINERS = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}
# Decoded length against the speech's: espeak-ng repeats itself only to within ~10 ms
# (pitch flutter: two sentences measured 93732..93966 samples over 8 runs), and mp3 /
# aac may carry up to two codec frames of delay and padding on top.
ESPEAK_S = 0.02
SLACK_S = {"mp3": 2 * 1152 / 24000, "aac": 2 * 1024 / 24000}


def decoded_seconds(data: bytes) -> tuple[str, float]:
    """(container format, seconds of audio) as PyAV (ffmpeg) decodes ``data``."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return container.format.name, samples / stream.codec_context.sample_rate


@pytest.fixture(scope="module")
def speech_seconds(mesh: SpeechMesh) -> float:
    """How long FORMATS_TEXT is spoken: its raw PCM's duration."""
    pcm = mesh.client().audio.speech.create(
        model="tts-1", voice="alloy", input=FORMATS_TEXT, response_format="pcm").content
    return len(pcm) / 2 / 24000


def assert_speech(response_format: str, data: bytes, seconds: float) -> None:
    if response_format == "pcm":
        got = len(data) / 2 / 24000
    else:
        container, got = decoded_seconds(data)
        assert CONTAINERS[response_format] in container.split(","), container
    slack = SLACK_S.get(response_format, 0.0) + ESPEAK_S
    assert seconds - ESPEAK_S <= got <= seconds + slack, (response_format, got, seconds)


@pytest.mark.parametrize("response_format", list(MEDIA_TYPES))
@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
def test_every_format_decodes_to_the_duration_of_the_speech(
    mesh: SpeechMesh, speech_seconds: float, response_format: str, streamed: bool
) -> None:
    client = mesh.client()
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=FORMATS_TEXT,
        response_format=response_format,  # type: ignore[arg-type]
        extra_body={"stream": streamed},
    ) as response:
        assert response.headers["content-type"].startswith(MEDIA_TYPES[response_format])
        # Streamed bodies are chunked as they are encoded; whole ones have a length.
        assert ("content-length" in response.headers) is not streamed
        data = b"".join(response.iter_bytes())
    assert_speech(response_format, data, speech_seconds)


def test_mp3_is_the_default_format_as_openai(mesh: SpeechMesh, speech_seconds: float) -> None:
    response = mesh.client().audio.speech.create(model="tts-1", voice="alloy",
                                                 input=FORMATS_TEXT)
    assert response.response.headers["content-type"] == "audio/mpeg"
    assert_speech("mp3", response.content, speech_seconds)


@pytest.mark.parametrize("response_format", ["mp3", "opus"])
def test_sse_deltas_carry_the_encoded_format(
    mesh: SpeechMesh, speech_seconds: float, response_format: str
) -> None:
    deltas = []
    with mesh.client().audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=FORMATS_TEXT, stream_format="sse",
        response_format=response_format,  # type: ignore[arg-type]
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[len("data: "):])
                if event["type"] == "speech.audio.delta":
                    deltas.append(base64.b64decode(event["audio"]))
                else:
                    assert event["type"] == "speech.audio.done", event
    assert deltas and all(deltas)  # no empty deltas while the codec fills a frame
    assert_speech(response_format, b"".join(deltas), speech_seconds)


def test_bad_requests_get_openai_errors(mesh: SpeechMesh) -> None:
    client = mesh.client()
    cases = [
        (dict(input=""), openai.BadRequestError, "input"),
        (dict(voice="no-such-voice"), openai.BadRequestError, "voice"),
        (dict(response_format="wma"), openai.BadRequestError, "response_format"),
        (dict(response_format="opus", extra_body={"sample_rate": 44100}),
         openai.BadRequestError, "sample_rate"),
        (dict(speed=10.0), openai.BadRequestError, "speed"),
        (dict(input="x" * 4097), openai.BadRequestError, "input"),
        (dict(model="no-such-model"), openai.NotFoundError, "model"),
    ]
    for overrides, error_type, param in cases:
        arguments = dict(model="tts-1", voice="alloy", input="Hello.") | overrides
        with pytest.raises(error_type) as caught:
            client.audio.speech.create(**arguments)  # type: ignore[arg-type]
        body = caught.value.body
        assert isinstance(body, dict) and body["param"] == param, body
        assert body["message"] and body["type"]


def test_voices_are_listed(mesh: SpeechMesh) -> None:
    voices = httpx.get(f"{mesh.base_url}/v1/audio/voices").json()
    names = {voice["id"] for voice in voices["data"]}
    assert voices["object"] == "list"
    assert {"alloy", "ash", "coral", "echo", "fable", "nova", "onyx", "shimmer", "en-gb"} <= names


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_client_that_goes_away_cancels_its_request_in_the_tts_replica(
    mesh: SpeechMesh,
) -> None:
    client = mesh.client()
    cancelled_before = _metric(mesh.metrics(),
                               'meshserve:speech_tts_cancelled_total{replica="tts/0"}')
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=LONG_TEXT, response_format="pcm", speed=0.25,
    ) as response:
        next(response.iter_bytes())  # audio is flowing; now hang up
    # The replica reports its counters about once a second (no event to wait on).
    deadline = time.monotonic() + 15
    while True:
        text = mesh.metrics()
        cancelled = _metric(text, 'meshserve:speech_tts_cancelled_total{replica="tts/0"}')
        running = _metric(text, 'meshserve:speech_tts_requests{replica="tts/0"}')
        busy = _metric(text, 'meshserve:speech_tts_engines_busy{replica="tts/0"}')
        if cancelled > cancelled_before and running == 0 and busy == 0:
            break
        assert time.monotonic() < deadline, text
        time.sleep(0.2)
    assert _metric(text, 'meshserve:speech_requests_total{outcome="cancelled"}') >= 1
    assert _metric(text, "meshserve:speech_requests_running") == 0
    # And the replica serves the next request normally.
    assert len(client.audio.speech.create(model="tts-1", voice="alloy", input="Next.").content) > 44


def test_a_lost_replica_hands_its_request_over_without_repeating_audio() -> None:
    with speech_mesh(replicas=2, engines=1) as mesh:
        client = mesh.client()
        reference = client.audio.speech.create(
            model="tts-1", voice="alloy", input=LONG_TEXT, response_format="pcm", speed=0.25,
        ).content
        received = bytearray()
        with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="alloy", input=LONG_TEXT, response_format="pcm", speed=0.25,
        ) as response:
            chunks = response.iter_bytes()
            received += next(chunks)
            # Both replicas idle: the gateway picked tts/0 (least loaded, then by name).
            # Freeze it mid-synthesis: it stops beating, the api reaps it and re-routes.
            os.kill(mesh.replicas[0].pid, signal.SIGSTOP)
            for chunk in chunks:
                received += chunk
        assert mesh.api_log.count("speech request re-routed") == 1
        # All the speech, once: the replay skipped what the client already had.
        assert abs(len(received) - len(reference)) < 0.01 * len(reference)
