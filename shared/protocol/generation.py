"""A request's messages on its way api -> tokenizer -> scheduler -> tokenizer -> api.

Ownership: the api holds what the client sent until the request ends; the scheduler
holds every token id (prompt and output) of every admitted request, which is why a
tokenizer replica that dies loses nothing: the scheduler re-sends a ``Reassign`` to
another replica, which rebuilds its detokenizer from the ids. The tokenizers hold
what a resubmission needs (prompt and output ids, sampling, priority, salt), which is
why a scheduler that dies loses nothing either: when a new scheduler incarnation
answers, each tokenizer re-sends every request it holds as a resuming ``Submit``.

Schema evolution: new fields get defaults and go last; never reorder. Version 3
(``PROTOCOL_VERSION``) added ``Submit.output_token_ids``/``resumed`` and the
``Reassign`` fields after ``finish_reason``.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from shared.protocol.logprobs import Logprobs
from shared.protocol.tools import ToolCall, ToolCallDelta, ToolCalling, ToolFunction

# Choices one request may fork into. Bounded on the wire: each choice costs the
# tokenizer and the scheduler state (and a reply when refused), so a frame claiming
# n = 2**31 must be a malformed message, not two billion of them.
MAX_CHOICES = 256
Choices = Annotated[int, msgspec.Meta(le=MAX_CHOICES)]


class SamplingParams(msgspec.Struct, frozen=True):
    """How to pick tokens. ``temperature == 0`` means greedy.

    With a ``seed``, the noise for output token k depends only on (seed, k), so a
    seeded request samples the same text whatever batch it runs in, and after a
    recompute preemption.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    # Logprobs (-1: none): of each sampled token with its ``logprobs`` most likely
    # alternatives; of each prompt token (but the first) with ``prompt_logprobs``.
    logprobs: int = -1
    prompt_logprobs: int = -1
    # vLLM's penalties: presence/frequency over the output, repetition over prompt
    # and output (1.0: off); min_p relative to the most likely token (0: off).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] = {}
    # Words never to generate: the api sends the strings, the tokenizer adds their
    # token sequences (with and without a leading space) in ``bad_words_token_ids``.
    bad_words: list[str] = []
    bad_words_token_ids: list[list[int]] = []
    # Structured outputs: llguidance's grammar JSON (shared/grammar.py) the output
    # must match, "" for none; ``grammar_field`` names the request field it came
    # from, for the 400 when it does not compile (``response_format``, ...).
    grammar: str = ""
    grammar_field: str = ""

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)


class ChatMessage(msgspec.Struct, frozen=True):
    """One message of a chat. ``content`` is None only for an assistant message
    that made ``tool_calls``; a ``tool`` message answers ``tool_call_id``."""

    role: str
    content: str | None
    tool_calls: list[ToolCall] = []
    tool_call_id: str | None = None
    name: str | None = None


# Stop strings a request may carry, and their length: every proper prefix of a stop
# string may be held back from the stream, so a megabyte stop string would cost the
# tokenizer quadratic work per request (vLLM and OpenAI document no bound; 4 is
# OpenAI's count).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024


def stop_strings_problem(stop: list[str]) -> str | None:
    """Why ``stop`` cannot be served, or None."""
    if len(stop) > MAX_STOP_STRINGS:
        return f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}"
    longest = max((len(s) for s in stop), default=0)
    if longest > MAX_STOP_CHARS:
        return f"a stop string has at most {MAX_STOP_CHARS} characters, got {longest}"
    return None


class DetokenizeSpec(msgspec.Struct, frozen=True):
    """What a tokenizer needs to turn output ids into client text."""

    stop: list[str] = []
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Completions' ``echo``: the first TextDelta carries the prompt's text.
    echo: bool = False
    # Tool calls: the parser the tokenizer picked for this request ("" none;
    # tool_parsers.PARSERS) and, for "function", the function's name. Set by the
    # tokenizer, so a replica that takes the request over parses alike.
    tool_parser: str = ""
    tool_function: str = ""
    tool_parallel: bool = True


class GenerateRequest(msgspec.Struct, frozen=True, tag=True):
    """api -> tokenizer: encode this prompt (or chat) and submit it.

    Exactly one of ``prompt``, ``prompt_token_ids`` (packed int32) or ``messages``
    is set; the api validates that before sending.
    """

    request_id: str
    sampling: SamplingParams
    detokenize: DetokenizeSpec
    prompt: str | None = None
    prompt_token_ids: bytes | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    priority: int = 0
    max_model_len: int = 0  # 0: let the scheduler decide
    # n > 1: the choices ``<request_id>-<i>`` fork after the prompt (one Submit, one
    # detokenizer state per choice id; choice i samples with ``seed + i``).
    n: Choices = 1
    # Keys the prefix cache: requests under different salts never share blocks.
    cache_salt: str = ""
    # Chat tools: passed to the template; ``tool_calling`` None: output not parsed.
    tools: list[ToolFunction] | None = None
    tool_calling: ToolCalling | None = None


class Submit(msgspec.Struct, frozen=True, tag=True):
    """tokenizer -> scheduler: a tokenized request, ready to be queued."""

    request_id: str
    prompt_token_ids: bytes  # packed int32
    sampling: SamplingParams
    detokenize: DetokenizeSpec
    priority: int = 0
    # n > 1: one request whose prompt is computed once and forked copy-on-write
    # into choices ``<request_id>-<i>`` (choice i samples with ``seed + i``); the
    # scheduler's outputs, aborts and failures name those choice ids.
    n: Choices = 1
    cache_salt: str = ""  # extra key of the prefix cache's block hashes
    # A resumption after a scheduler restart: the request had generated these output
    # ids already (packed int32). The scheduler queues prompt + outputs to be
    # recomputed and counts the outputs against max_tokens/min_tokens and in
    # ``TokenOutput.num_prior``; seeded noise continues at output index
    # len(output ids). A resumption names one request: n == 1, and a choice of an
    # n > 1 request resumes under its choice id with its own seed (``choice_sampling``).
    output_token_ids: bytes = b""
    # True for every resumption (also one with no outputs yet): it was admitted
    # before, so a full waiting queue does not refuse it.
    resumed: bool = False


class Abort(msgspec.Struct, frozen=True, tag=True):
    """Stop these requests and free what they hold. Idempotent; unknown ids are
    remembered for a while so an abort that overtakes its Submit still wins."""

    request_ids: list[str]
    reason: str = "abort"


class TokenOutput(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """New output ids of one request after one step."""

    request_id: str
    token_ids: bytes  # packed int32, the new ids only
    num_prior: int  # output ids this request had before these
    prompt_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # Requests asking for logprobs: those of token_ids (one Logprobs per step), and
    # of the prompt (with the first output, once the whole prompt is computed).
    logprobs: list[Logprobs] = []
    prompt_logprobs: list[Logprobs] = []


class TokenBatch(msgspec.Struct, frozen=True, tag=True, gc=False):
    """scheduler -> tokenizer: one step's outputs for the requests this replica owns."""

    outputs: list[TokenOutput]


class Reassign(msgspec.Struct, frozen=True, tag=True):
    """scheduler -> tokenizer: take over a request whose tokenizer replica died.

    ``sampling`` (the request's own: a choice's carries its choice seed),
    ``priority`` and ``cache_salt`` let the new owner resume the request should the
    scheduler restart later; without them (None) it cannot, and fails it then.
    """

    request_id: str
    detokenize: DetokenizeSpec
    prompt_token_ids: bytes
    output_token_ids: bytes
    finish_reason: str | None = None
    sampling: SamplingParams | None = None
    priority: int = 0
    cache_salt: str = ""


class TextDelta(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """New client text of one request. ``offset`` is how many characters of output
    came before ``text``: the api drops what it already delivered, so a replayed
    request after a tokenizer failover never duplicates text."""

    request_id: str
    text: str
    offset: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    # As in TokenOutput, with each id's text filled in (``Logprobs.tokens``).
    logprobs: list[Logprobs] = []
    prompt_logprobs: list[Logprobs] = []
    prompt_text: str | None = None  # echo: the prompt's text, in the first delta
    prompt_first_token: str = ""  # echo: the first prompt token's text (no logprob)
    # Calls parsed out of the output (``text`` is then the content outside them).
    tool_calls: list[ToolCallDelta] = []


class TextBatch(msgspec.Struct, frozen=True, tag=True, gc=False):
    """tokenizer -> api: text deltas of one step."""

    deltas: list[TextDelta]


class RequestFailed(msgspec.Struct, frozen=True, tag=True):
    """A request ends in an error the client must see (HTTP ``status``).

    ``code`` is OpenAI-style: ``invalid_request_error``, ``server_busy``, ...
    """

    request_id: str
    status: int
    code: str
    message: str


class SetRouting(msgspec.Struct, frozen=True, tag=True):
    """Change the scheduler's placement mode at run time (``meshserve kv set routing
    MODE``): requests placed from now on follow it; queued ones stay where they are.
    Answered by SchedulerStatus, or Rejected for an unknown mode."""

    routing: str


class WorkerStatus(msgspec.Struct, frozen=True):
    """One worker's share of ``SchedulerStatus`` (``meshserve kv stats``, /metrics
    with a ``worker`` label). Counters since the scheduler started."""

    worker: str
    waiting: int = 0  # requests in its queue (placed there, swapped-out ones included)
    running: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up at admission on it
    prefix_cache_hits: int = 0
    requests_placed: int = 0  # new requests routing placed on it
    rebalanced_in: int = 0  # waiting requests it took from a backlogged peer
    kv_usage: float = 0.0
    # Prefill/decode hand-offs (KV transfers) it sends or receives: live ones, ended
    # ones by outcome, and the bytes its own side reported moved.
    role: str = "both"
    transfers_in_flight: int = 0
    transfers_completed: int = 0
    transfers_failed: int = 0
    transfer_bytes: int = 0


class SchedulerStatus(msgspec.Struct, frozen=True, tag=True):
    """scheduler -> api, in answer to the api's hello: enough for /health and
    /metrics without another round trip."""

    workers: int
    running: int
    waiting: int
    kv_usage: float = 0.0
    # Counters since the scheduler started (vLLM's prefix cache counters count tokens).
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    kv_cached_blocks: int = 0  # free blocks still caching a prefix, all pools
    kv_evictions: int = 0
    # Copy-on-write forks (n > 1): blocks forks took over from their parent, and
    # blocks copied because a fork wrote into a shared one.
    fork_shared_blocks: int = 0
    cow_block_copies: int = 0
    # Host tier (swap preemption): requests swapped out / back in, the blocks each
    # way, and the host pools (all workers) in blocks.
    num_swap_outs: int = 0
    num_swap_ins: int = 0
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    host_kv_blocks: int = 0
    host_kv_used_blocks: int = 0
    swap_fallbacks: int = 0  # swapped requests sent to recompute (host pool shrank)
    # Longest prompt + output a request may have (min over workers and the
    # scheduler's setting); 0: no worker yet. /v1/models and /tokenize report it.
    max_model_len: int = 0
    routing: str = ""  # the scheduler's placement mode
    per_worker: list[WorkerStatus] = []
