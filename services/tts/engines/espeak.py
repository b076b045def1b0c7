"""espeak-ng through ctypes, from the ``espeakng-loader`` wheel (library + data).

The library keeps global state (one voice, one set of parameters, one callback), so
an engine process runs one synthesis at a time and a replica scales with processes.
Synthesis is synchronous: ``espeak_Synth`` calls our callback with each buffer of
audio (``BUFFER_MS`` of speech) and stops when the callback returns 1, which is how a
cancel frees the engine mid-chunk. Input is never parsed as SSML or phonemes.
"""

from __future__ import annotations

import ctypes
from typing import Any

from services.tts.engines.base import AudioSink, EngineError
from shared.protocol.speech import SpeechVoice

ENGINE_NAME = "espeak-ng"
# OpenAI's model names are accepted too, so unmodified clients work.
MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000  # a sentence pause after each chunk, as between sentences of one text
_RATE = 1  # espeak_PARAMETER espeakRATE, words per minute
_EE_OK = 0

BUFFER_MS = 100  # audio per callback: the upper bound on how late a cancel is seen
DEFAULT_WPM = 175
# Below 80 wpm espeak-ng clamps; above ~700 it turns unintelligible.
MIN_WPM, MAX_WPM = 80, 700

# OpenAI's voice names, mapped onto espeak-ng voices and variants so clients that
# pass them get distinct voices.
OPENAI_VOICES: dict[str, tuple[str, str, str]] = {
    # name: (espeak voice, language, gender)
    "alloy": ("gmw/en-US", "en-us", ""),
    "ash": ("gmw/en-US+m3", "en-us", "male"),
    "ballad": ("gmw/en+m2", "en-gb", "male"),
    "coral": ("gmw/en-US+f2", "en-us", "female"),
    "echo": ("gmw/en-US+m1", "en-us", "male"),
    "fable": ("gmw/en", "en-gb", ""),
    "nova": ("gmw/en-US+f3", "en-us", "female"),
    "onyx": ("gmw/en-US+m7", "en-us", "male"),
    "sage": ("gmw/en-US+f4", "en-us", "female"),
    "shimmer": ("gmw/en-US+f5", "en-us", "female"),
    "verse": ("gmw/en-US+m2", "en-us", "male"),
    "marin": ("gmw/en-US+f1", "en-us", "female"),
    "cedar": ("gmw/en-US+m6", "en-us", "male"),
}

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _Voice(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    )


def speed_to_wpm(speed: float) -> int:
    """OpenAI's speed multiplier (0.25..4.0) as espeak-ng words per minute."""
    return max(MIN_WPM, min(MAX_WPM, round(DEFAULT_WPM * speed)))


class EspeakEngine:
    """The ``Engine`` for espeak-ng; one per process."""

    name = ENGINE_NAME

    def __init__(self) -> None:
        self.sample_rate = 0
        self._lib: Any = None
        self._voices: dict[str, str] = {}  # client name -> espeak voice spec
        self._catalog: list[SpeechVoice] = []
        self._current_voice: str | None = None
        self._current_wpm: int | None = None
        self._sink: AudioSink | None = None
        self._aborted = False
        self._sink_error: BaseException | None = None
        # Kept referenced for as long as the library may call it.
        self._callback = _CALLBACK(self._on_audio)

    def load(self) -> None:
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.restype = ctypes.c_int
        self._lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        self._lib.espeak_SetVoiceByName.argtypes = (ctypes.c_char_p,)
        data_path = espeakng_loader.get_data_path().encode()
        rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, BUFFER_MS, data_path, _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise EngineError(f"espeak_Initialize failed ({rate}) with data at {data_path!r}")
        self.sample_rate = rate
        self._lib.espeak_SetSynthCallback(self._callback)
        self._build_catalog()

    def _build_catalog(self) -> None:
        for name, (spec, language, gender) in OPENAI_VOICES.items():
            self._voices[name] = spec
            self._catalog.append(
                SpeechVoice(name, language, f"espeak-ng {spec}", gender)
            )
        listed = self._lib.espeak_ListVoices(None)
        i = 0
        while listed[i]:
            voice = listed[i].contents
            i += 1
            # `languages` is a list of (priority byte, name, NUL); the first is the main one.
            language = (voice.languages or b"\x00")[1:].decode(errors="replace")
            identifier = (voice.identifier or b"").decode(errors="replace")
            if not language or not identifier or language in self._voices:
                continue
            self._voices[language] = identifier
            self._catalog.append(
                SpeechVoice(
                    language,
                    language,
                    (voice.name or b"").decode(errors="replace"),
                    {1: "male", 2: "female"}.get(voice.gender, ""),
                )
            )

    def models(self) -> list[str]:
        return [ENGINE_NAME, *MODEL_ALIASES]

    def voices(self) -> list[SpeechVoice]:
        return list(self._catalog)

    def _on_audio(self, wav: Any, num_samples: int, _events: Any) -> int:
        # Runs inside espeak_Synth; an exception here would only be printed by ctypes,
        # so it is kept and re-raised once espeak returns.
        if self._aborted:
            return 1
        if not wav or num_samples <= 0 or self._sink is None:
            return 0
        try:
            if not self._sink(ctypes.string_at(wav, num_samples * 2)):
                self._aborted = True
        except BaseException as e:
            self._sink_error = e
            self._aborted = True
        return 1 if self._aborted else 0

    def synthesize(self, text: str, voice: str, speed: float, sink: AudioSink) -> bool:
        if self._lib is None:
            raise EngineError("espeak-ng is not loaded")
        spec = self._voices.get(voice)
        if spec is None:
            raise EngineError(f"unknown voice {voice!r}")
        if spec != self._current_voice:
            if self._lib.espeak_SetVoiceByName(spec.encode()) != _EE_OK:
                raise EngineError(f"espeak-ng cannot load voice {spec!r}")
            self._current_voice = spec
            self._current_wpm = None  # a voice change resets the rate
        wpm = speed_to_wpm(speed)
        if wpm != self._current_wpm:
            self._lib.espeak_SetParameter(_RATE, wpm, 0)
            self._current_wpm = wpm
        # A NUL would end the C string early.
        encoded = text.replace("\x00", " ").encode()
        self._sink, self._aborted, self._sink_error = sink, False, None
        try:
            result = self._lib.espeak_Synth(
                encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0,
                _CHARS_UTF8 | _ENDPAUSE, None, None,
            )
        finally:
            self._sink = None
        if self._sink_error is not None:
            raise self._sink_error
        if result != _EE_OK:
            raise EngineError(f"espeak_Synth failed with status {result}")
        return not self._aborted

    def close(self) -> None:
        if self._lib is not None:
            self._lib.espeak_Terminate()
            self._lib = None
