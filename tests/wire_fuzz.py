"""Hypothesis strategies for fuzzing meshserve's sockets with frames, and the real
messages they mutate.

A socket family (``FAMILIES``) is what one socket decodes: its real messages
(``shared/protocol/*``, built here as a peer would send them) and the Hello a peer
says first. ``frames(family)`` draws one message's frames, mixing:

- pure garbage (random frames, any count);
- truncated msgpack (a real message's envelope or body cut short);
- real messages in a valid envelope, mutated: wrong or unknown tags, fields of the
  wrong type, out-of-range values (huge, negative, NaN), huge strings and lists,
  packed int32 arrays of the wrong size or with ids out of any range, missing and
  extra fields;
- a broken envelope (wrong version, wrong types) around a real body;
- missing and extra frames.

Everything is drawn from hypothesis, so a run with ``derandomize=True`` is the same
run every time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import strategies as st

from shared.protocol.common import Hello, Rejected, Welcome, WorkerDetails
from shared.protocol.control import RestartRequest, ScaleRequest, StatusRequest
from shared.protocol.envelope import PROTOCOL_VERSION, Envelope, pack_i32, pack_i64
from shared.protocol.generation import (
    Abort,
    ChatMessage,
    DetokenizeSpec,
    GenerateRequest,
    Reassign,
    RequestFailed,
    SamplingParams,
    SchedulerStatus,
    SetRouting,
    Submit,
    TextBatch,
    TextDelta,
    TokenBatch,
    TokenOutput,
)
from shared.protocol.kv import (
    KvDumpRequest,
    KvHostResize,
    KvLease,
    KvPoolClose,
    KvPoolOpen,
    KvSetHostSwap,
    KvStats,
    KvStatsRequest,
    KvSync,
    KvUsage,
)
from shared.protocol.speech import (
    SpeechCancel,
    SpeechCatalog,
    SpeechCatalogRequest,
    SpeechChunk,
    SpeechFailed,
    SpeechRequest,
    SpeechStatus,
    SpeechStatusRequest,
    SpeechVoice,
)
from shared.protocol.step import NewRequest, StepBatch, StepPlan, StepResult
from shared.protocol.tables import (
    BlockCopies,
    BlockHashes,
    BlockMoves,
    BlockReplaces,
    RequestBlocks,
)
from shared.protocol.transfer import (
    KvBlockLayout,
    KvTransferCancel,
    KvTransferIn,
    KvTransferOut,
    TransferAbort,
    TransferBegin,
    TransferChunk,
)

INT32 = (-(2**31), 2**31 - 1)
# Values that break code which assumes "small and positive": every width's edges.
EDGE_INTS = (-(2**63), -(2**31) - 1, -(2**31), -1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**63 - 1,
             2**64 - 1)
HUGE_TEXT = "é" * 300_000
HUGE_BYTES = b"\xff" * 1_000_003
HUGE_LIST_LEN = 100_000

_encode = msgspec.msgpack.Encoder().encode


def _worker(num_kv_blocks: int = 64, vocab_size: int = 512) -> WorkerDetails:
    return WorkerDetails(model="fuzz", num_kv_blocks=num_kv_blocks, block_size=16,
                         max_model_len=256, vocab_size=vocab_size, eos_token_ids=[2],
                         device="cpu", kv_block_bytes=4096)


def _hello(service: str, replica: int = 90, **extra: Any) -> Hello:
    return Hello(service=service, replica=replica, incarnation="fuzz", protocol=PROTOCOL_VERSION,
                 pid=1, **extra)


_SAMPLING = SamplingParams(max_tokens=4, temperature=0.0, seed=7, stop_token_ids=[2])
_DETOK = DetokenizeSpec(stop=["\n"])


def _step_plan() -> StepPlan:
    return StepPlan(
        step_id=1, finished=["x"],
        new=[NewRequest("fz-1", pack_i32([1, 5, 9]), 0, _SAMPLING)],
        host_num_blocks=4,
        swap_out=BlockMoves.pack({"fz-0": ([1], [0])}),
        swap_in=BlockMoves.pack({"fz-2": ([0], [3])}),
        replaces=BlockReplaces.pack({"fz-1": [(0, 5)]}),
        copies=BlockCopies.pack([(1, 2)]),
        batch=StepBatch.pack(["fz-1"], [3], [[0]]),
    )


# The real messages of each receiving side (what a well-behaved peer sends it).
_TO_API = [TextBatch([TextDelta("fz-1", "hé", 0, 3, 1, None)]),
           RequestFailed("fz-1", 429, "server_busy", "busy")]
_TO_SCHEDULER = [
    Submit("fz-1", pack_i32([1, 5, 9]), _SAMPLING, _DETOK),
    Submit("fz-2", pack_i32([3] * 40), SamplingParams(max_tokens=2), _DETOK, n=2,
           cache_salt="s"),
    Abort(["fz-1", "fz-2"]),
    StepResult(1, ["fz-1"], pack_i32([7])),
    StepResult(2, ["fz-1", "fz-2"], pack_i32([7, 8]), error=None),
    KvStatsRequest(),
    SetRouting("prefix"),
]
_TO_KVCACHE = [
    KvPoolOpen("fuzz/0", 64, 16, 8, RequestBlocks.pack({"fz-1": [1, 2]}), pack_i32([3, 4]),
               1, 4096),
    KvSync("fuzz/0", 2, pack_i32([1]), RequestBlocks.pack({"fz-1": [2]}), ["fz-3"],
           RequestBlocks.pack({"fz-1": [3, 4]}), BlockHashes(pack_i32([3]), pack_i64([99])),
           ["fz-4"], RequestBlocks.pack({"fz-5": [0]}), 8),
    KvPoolClose("fuzz/0"), KvStatsRequest(), KvDumpRequest("fz-1"), KvSetHostSwap(0.001),
]
_TO_SPEECH_GATEWAY = [
    SpeechChunk("fz-1", 0, b"\x01\x00" * 8, 24000, False, 0),
    SpeechChunk("fz-1", 1, b"", 24000, True, 8),
    SpeechFailed("fz-1", 500, "engine_error", "boom"),
    SpeechCatalog("espeak-ng", 22050, ["tts-1"], [SpeechVoice("alloy", "en-us")], 4096),
    SpeechStatus(2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, [1, 2]),
]
# Control requests that change nothing (status) or that a fuzzer may send for
# real (a scale or restart of a service that does not exist); mutations that turn
# into a real shutdown, restart or scale are filtered by the test.
_TO_CONTROL = [StatusRequest(), RestartRequest("fuzz"), ScaleRequest("fuzz", 2)]
_TO_TOKENIZER_FROM_API = [
    GenerateRequest("fz-1", _SAMPLING, _DETOK, prompt="hello"),
    GenerateRequest("fz-2", _SAMPLING, _DETOK, prompt_token_ids=pack_i32([1, 2, 3])),
    GenerateRequest("fz-3", _SAMPLING, _DETOK, messages=[ChatMessage("user", "hi")], n=2),
    Abort(["fz-1"]),
]
_TO_TOKENIZER_FROM_SCHEDULER = [
    TokenBatch([TokenOutput("fz-1", pack_i32([5, 6]), 0, 3, None)]),
    TokenBatch([TokenOutput("fz-1", pack_i32([7]), 2, 3, "stop")]),
    Reassign("fz-1", _DETOK, pack_i32([1, 2]), pack_i32([5, 6])),
    RequestFailed("fz-1", 400, "invalid_request_error", "no"),
    Abort(["fz-1"]),
]
_TO_WORKER = [_step_plan(), StepPlan(step_id=2, finished=["fz-1"]),
              KvTransferOut.of("fz-t", "ipc:///tmp/fz-nowhere.sock", [1, 2]),
              KvTransferIn.of("fz-t", [3, 4], 1.0), KvTransferCancel("fz-t")]
_LAYOUT = KvBlockLayout(2, 16, 2, 8, "float32")
# The KV transfer socket (a worker's ROUTER; senders connect without a hello).
_TO_TRANSFER_RECEIVER = [TransferBegin("fz-t", 2, 1, _LAYOUT, 1.0),
                         TransferChunk("fz-t", 0, 0, 1), TransferAbort("fz-t", "x", True)]
_TO_TTS = [
    SpeechRequest("fz-1", "hello there", "alloy", 1.0, 16000),
    SpeechCancel(["fz-1"]),
    SpeechCatalogRequest(),
    SpeechStatusRequest(),
]
_FROM_SINGLETON = [Welcome("fuzz", "fuzz"), Rejected("no", 3)]
_USAGE = KvUsage("worker/0", 64, 3, 8, 53, 1)
_TO_SCHEDULER_FROM_KVCACHE = [
    KvLease("worker/0", 1, pack_i32([4, 5, 6]), _USAGE),
    KvHostResize("worker/0", 16),
    KvStats([_USAGE]),
]
_TO_API_FROM_SCHEDULER = [SchedulerStatus(workers=1, running=2, waiting=3, kv_usage=0.5,
                                          max_model_len=64)]


@dataclass(frozen=True)
class Family:
    """What one socket receives: its real messages, and whether frames go to a
    ROUTER (the fuzzer is a replica: it says ``hello`` first) or a DEALER."""

    name: str
    messages: tuple[Any, ...]
    hello: Hello | None = None


FAMILIES: dict[str, Family] = {
    "api": Family("api", (*_TO_API, _hello("tokenizer")), _hello("tokenizer")),
    "scheduler": Family("scheduler", (*_TO_SCHEDULER, _hello("worker", worker=_worker()),
                                      _hello("api")), _hello("tokenizer")),
    "kvcache": Family("kvcache", (*_TO_KVCACHE, _hello("scheduler")), _hello("scheduler")),
    "speech": Family("speech", (*_TO_SPEECH_GATEWAY, _hello("tts", capacity=2)),
                     _hello("tts", capacity=2)),
    "supervisor": Family("supervisor", (_hello("worker", 0), _hello("tts", 0), Rejected("x"))),
    "control": Family("control", tuple(_TO_CONTROL)),
    "tokenizer-api": Family("tokenizer-api", (*_TO_TOKENIZER_FROM_API, *_FROM_SINGLETON)),
    "tokenizer-scheduler": Family("tokenizer-scheduler",
                                  (*_TO_TOKENIZER_FROM_SCHEDULER, *_FROM_SINGLETON)),
    "worker": Family("worker", (*_TO_WORKER, *_FROM_SINGLETON)),
    "transfer": Family("transfer", tuple(_TO_TRANSFER_RECEIVER)),
    "tts": Family("tts", (*_TO_TTS, *_FROM_SINGLETON)),
    # The singletons' own DEALERs: the scheduler's to the KV manager, the api's to
    # the scheduler.
    "scheduler-kvcache": Family("scheduler-kvcache",
                                (*_TO_SCHEDULER_FROM_KVCACHE, *_FROM_SINGLETON)),
    "api-scheduler": Family("api-scheduler", (*_TO_API_FROM_SCHEDULER, *_FROM_SINGLETON)),
}

# Every tag on the wire: a message with another socket's tag is a "wrong tag".
ALL_TAGS = sorted({type(m).__name__ for f in FAMILIES.values() for m in f.messages} |
                  {"StepPlan", "KvLease", "Hello", "Nope", ""})


def envelope_frame(sender: str = "fuzz/0", msg_id: int = 1) -> bytes:
    return _encode(Envelope(PROTOCOL_VERSION, msg_id, sender))


def real_frames(message: Any, sender: str = "fuzz/0") -> list[bytes]:
    return [envelope_frame(sender), _encode(message)]


# --------------------------------------------------------------------- values

edge_ints = st.sampled_from(EDGE_INTS)
any_int = st.one_of(edge_ints, st.integers(-(2**63), 2**64 - 1))
int32s = st.one_of(st.sampled_from([i for i in EDGE_INTS if INT32[0] <= i <= INT32[1]]),
                   st.integers(*INT32))
# Packed int32 arrays: the wrong size, ids out of any range, or far too many.
packed = st.one_of(
    st.binary(max_size=23),
    st.lists(int32s, max_size=12).map(pack_i32),
    st.just(pack_i32([2**31 - 1]) * HUGE_LIST_LEN),
    st.just(HUGE_BYTES),
)
leaves = st.one_of(
    st.none(), st.booleans(), any_int, st.floats(), st.text(max_size=12),
    st.binary(max_size=16), packed, st.sampled_from(ALL_TAGS), st.just(HUGE_TEXT),
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


def _same_kind(value: Any) -> st.SearchStrategy[Any]:
    """A value of the kind already there, out of its range: what gets past a type check."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return any_int
    if isinstance(value, float):
        return st.one_of(st.floats(), st.sampled_from([1e308, -1e308, 1e-308]))
    if isinstance(value, str):
        return st.one_of(st.text(max_size=12), st.sampled_from(ALL_TAGS), st.just(HUGE_TEXT))
    if isinstance(value, bytes):
        return packed
    if isinstance(value, list):
        return st.one_of(st.just([]), st.just(value * 50), st.lists(values, max_size=3))
    return values


# ------------------------------------------------------------------ mutation

Path = tuple[Any, ...]


def _paths(tree: Any, prefix: Path = ()) -> list[Path]:
    """Every node's path in a msgpack-able tree (dicts and lists)."""
    found = [prefix]
    if isinstance(tree, dict):
        for key, child in tree.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(tree, list):
        for i, child in enumerate(tree):
            found += _paths(child, (*prefix, i))
    return found


def _get(tree: Any, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _replace(tree: Any, path: Path, value: Any) -> Any:
    if not path:
        return value
    parent = _get(tree, path[:-1])
    parent[path[-1]] = value
    return tree


@st.composite
def _mutate_once(draw: st.DrawFn, tree: Any) -> Any:
    path = draw(st.sampled_from(_paths(tree)))
    node = _get(tree, path)
    ops: list[str] = ["same_kind", "any"]
    if path:
        ops.append("delete")
    if isinstance(node, dict):
        ops += ["add_key", "retag"]
    if isinstance(node, list):
        ops += ["append", "truncate"]
    op = draw(st.sampled_from(ops))
    if op == "same_kind":
        return _replace(tree, path, draw(_same_kind(node)))
    if op == "any":
        return _replace(tree, path, draw(values))
    if op == "delete":
        parent = _get(tree, path[:-1])
        del parent[path[-1]]
        return tree
    if op == "add_key":
        node[draw(st.text(max_size=6))] = draw(values)
        return tree
    if op == "retag":
        node["type"] = draw(st.sampled_from(ALL_TAGS))
        return tree
    if op == "append":
        node.extend(draw(st.lists(values, min_size=1, max_size=3)))
        return tree
    del node[draw(st.integers(0, len(node))):]
    return tree


@st.composite
def mutated(draw: st.DrawFn, message: Any) -> Any:
    """``message`` as builtins, with 1-3 mutations."""
    tree = msgspec.to_builtins(message, builtin_types=(bytes,))
    for _ in range(draw(st.integers(1, 3))):
        tree = draw(_mutate_once(tree))
    return tree


def _safe_encode(tree: Any) -> bytes:
    try:
        return _encode(tree)
    except (OverflowError, TypeError, ValueError):  # an int past 64 bits
        return b"\xc1"  # msgpack's "never used" byte


# -------------------------------------------------------------------- frames

def _messages(family: Family) -> st.SearchStrategy[Any]:
    return st.sampled_from(family.messages)


def garbage() -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.binary(max_size=48), min_size=1, max_size=4)


@st.composite
def truncated(draw: st.DrawFn, family: Family) -> list[bytes]:
    frames = real_frames(draw(_messages(family)))
    which = draw(st.integers(0, 1))
    frames[which] = frames[which][: draw(st.integers(0, max(0, len(frames[which]) - 1)))]
    return frames


@st.composite
def mutated_message(draw: st.DrawFn, family: Family) -> list[bytes]:
    body = _safe_encode(draw(mutated(draw(_messages(family)))))
    return [envelope_frame(msg_id=draw(any_int.filter(lambda i: 0 <= i < 2**64))), body]


@st.composite
def bad_envelope(draw: st.DrawFn, family: Family) -> list[bytes]:
    envelope = draw(mutated(Envelope(PROTOCOL_VERSION, 1, "fuzz/0", "00-x", "")))
    return [_safe_encode(envelope), _encode(draw(_messages(family)))]


@st.composite
def wrong_frame_count(draw: st.DrawFn, family: Family) -> list[bytes]:
    frames = real_frames(draw(_messages(family)))
    shape = draw(st.sampled_from(["envelope_only", "body_only", "extra", "swapped"]))
    if shape == "envelope_only":
        return frames[:1]
    if shape == "body_only":
        return frames[1:]
    if shape == "swapped":
        return frames[::-1]
    return frames + draw(st.lists(st.binary(max_size=16), min_size=1, max_size=3))


def frames(family: Family) -> st.SearchStrategy[list[bytes]]:
    """One message's frames for a socket of ``family`` (after any routing frame)."""
    return st.one_of(
        garbage(),
        truncated(family),
        mutated_message(family),
        mutated_message(family),
        mutated_message(family),
        bad_envelope(family),
        wrong_frame_count(family),
    )


# ------------------------------------------------------- byte-level mutants
# Hypothesis draws structured frames; each is then bent at the byte level by a
# seeded ``Random`` (the seed drawn by hypothesis, so still reproducible) into more
# frames. That is how a classic mutation fuzzer works, and it costs microseconds per
# frame where a hypothesis draw costs milliseconds.

# msgpack headers that claim a huge container or string follows.
_HUGE_HEADERS = (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff",
                 b"\xc6\x7f\xff\xff\xff", b"\xdc\xff\xff")
_INTERESTING = (0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xC2, 0xCC, 0xCF, 0xD3, 0xDC, 0xDE, 0xFF)


def _bend(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    op = rng.randrange(5)
    if op == 0 and data:  # flip bits
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == 1 and data:  # an interesting byte
        data[rng.randrange(len(data))] = rng.choice(_INTERESTING)
    elif op == 2:  # a header claiming a huge length
        at = rng.randint(0, len(data))
        data[at:at] = rng.choice(_HUGE_HEADERS)
    elif op == 3 and data:  # cut short
        del data[rng.randrange(len(data)):]
    else:  # a random run of bytes
        at = rng.randint(0, len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 8))
    return bytes(data)


def bent(frames: list[bytes], seed: int, count: int) -> list[list[bytes]]:
    """``count`` byte-level mutants of ``frames``: bent bytes, dropped, repeated or
    spliced frames."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        mutant = list(frames)
        op = rng.randrange(10)
        if op == 0 and len(mutant) > 1:
            del mutant[rng.randrange(len(mutant))]
        elif op == 1:
            mutant.insert(rng.randint(0, len(mutant)), rng.choice(mutant))
        elif op == 2 and len(mutant) > 1:
            i, j = rng.randrange(len(mutant)), rng.randrange(len(mutant))
            mutant[i] = mutant[i][: rng.randint(0, len(mutant[i]))] + mutant[j][rng.randint(
                0, len(mutant[j])):]
        else:
            i = rng.randrange(len(mutant))
            mutant[i] = _bend(mutant[i], rng)
        out.append(mutant)
    return out


@st.composite
def fuzz_batch(draw: st.DrawFn, family: Family, drawn: int, per_drawn: int) -> list[list[bytes]]:
    """``drawn`` hypothesis frames, each followed by ``per_drawn - 1`` byte mutants."""
    batch: list[list[bytes]] = []
    for _ in range(drawn):
        original = draw(frames(family))
        batch.append(original)
        batch += bent(original, draw(st.integers(0, 2**32 - 1)), per_drawn - 1)
    return batch
