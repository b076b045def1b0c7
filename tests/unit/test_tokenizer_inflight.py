"""The tokenizer's request table, driven synchronously with hand-built outputs:
duplicates, gaps, stragglers, stop strings, scheduler finishes, reassignment and
resumption after a scheduler restart."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer

from services.tokenizer.inflight import InflightRequests, ResumeSpec
from shared.embedded_model import ensure_embedded_model
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import DetokenizeSpec, Reassign, SamplingParams, TokenOutput

PROMPT = [10, 11, 12]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(ensure_embedded_model() / "tokenizer.json"))


def make_table(tokenizer: Tokenizer, *ids: str, spec: DetokenizeSpec | None = None
               ) -> InflightRequests:
    table = InflightRequests(tokenizer, vocab_size=tokenizer.get_vocab_size())
    for request_id in ids:
        table.admit(request_id, PROMPT, spec or DetokenizeSpec(), trace=f"ctx-{request_id}")
    return table


def output(request_id: str, ids: Sequence[int], num_prior: int,
           finish_reason: str | None = None) -> TokenOutput:
    return TokenOutput(request_id, pack_i32(ids), num_prior, len(PROMPT), finish_reason)


def test_one_delta_per_request_with_running_offsets(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer, "a", "b")
    a = tokenizer.encode("hello world").ids
    b = tokenizer.encode("日本").ids
    first = table.apply([output("a", a[:2], 0), output("b", b[:2], 0)])
    # "b"'s first two ids are an unfinished character: no delta for it yet.
    assert [(d.request_id, d.text, d.offset) for d in first.deltas] == [("a", "hel", 0)]
    second = table.apply([output("a", a[2:], 2, "length"), output("b", b[2:], 2)])
    assert [(d.request_id, d.text, d.offset, d.finish_reason) for d in second.deltas] == [
        ("a", "lo world", 3, "length"),
        ("b", "日本", 0, None),
    ]
    final = second.deltas[0]
    assert (final.prompt_tokens, final.completion_tokens) == (3, len(a))
    assert "a" not in table and "b" in table
    assert [(f.request_id, f.finish_reason, f.trace) for f in second.finished] == [
        ("a", "length", "ctx-a")
    ]


def test_duplicate_ids_are_skipped_by_num_prior(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer, "a")
    ids = tokenizer.encode("abc def").ids
    table.apply([output("a", ids[:2], 0)])
    # A re-sent output overlapping what was seen: only the new ids count.
    outcome = table.apply([output("a", ids[:], 0, "stop")])
    assert "".join(d.text for d in outcome.deltas) == tokenizer.decode(ids[2:])
    assert outcome.deltas[0].completion_tokens == len(ids)


def test_a_gap_fails_the_request(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer, "a")
    outcome = table.apply([output("a", [70], 5)])
    assert outcome.deltas == [] and outcome.orphaned == ["a"]
    assert outcome.failed[0].status == 500 and "has seen only 0" in outcome.failed[0].message
    assert "a" not in table


@pytest.mark.parametrize("packed", [b"\x01\x02\x03", pack_i32([5, 999_999]), pack_i32([-3])])
def test_corrupt_ids_fail_only_that_request(tokenizer: Tokenizer, packed: bytes) -> None:
    table = make_table(tokenizer, "bad", "good")
    outcome = table.apply([
        TokenOutput("bad", packed, 0, 3),
        output("good", tokenizer.encode("fine").ids, 0),
    ])
    assert [f.request_id for f in outcome.failed] == ["bad"]
    assert [d.request_id for d in outcome.deltas] == ["good"]
    assert "bad" not in table and "good" in table


def test_unknown_and_straggler_outputs(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer, "a")
    table.drop("a")  # e.g. the api aborted it
    outcome = table.apply([output("a", [70], 0), output("never-seen", [70], 0)])
    assert outcome.stragglers == 1
    assert outcome.unknown == ["never-seen"] and outcome.orphaned == ["never-seen"]
    assert outcome.deltas == [] and outcome.failed == []


def test_stop_string_ends_the_request_and_asks_for_an_abort(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer, "a", spec=DetokenizeSpec(stop=["STOP"]))
    ids = tokenizer.encode("stop here STOP now").ids
    deltas = []
    outcome = None
    for n, token_id in enumerate(ids):
        outcome = table.apply([output("a", [token_id], n)])
        deltas += outcome.deltas
        if "a" not in table:
            break
    assert outcome is not None and outcome.stopped == ["a"]
    assert "".join(d.text for d in deltas) == "stop here "
    assert deltas[-1].finish_reason == "stop"
    # The ids after the match were never produced here; later ones are stragglers.
    assert table.apply([output("a", [70], len(ids))]).stragglers == 1


def test_scheduler_finish_flushes_held_text(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer, "a", spec=DetokenizeSpec(stop=["###"]))
    ids = tokenizer.encode("value: ##").ids
    first = table.apply([output("a", ids, 0)])
    assert "".join(d.text for d in first.deltas) == "value: "
    last = table.apply([output("a", [], len(ids), "length")])
    assert [(d.text, d.offset, d.finish_reason) for d in last.deltas] == [("##", 7, "length")]
    assert last.stopped == []


def test_stop_and_scheduler_finish_in_the_same_output(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer, "a", spec=DetokenizeSpec(stop=["END"]))
    ids = tokenizer.encode("the END").ids
    outcome = table.apply([output("a", ids, 0, "length")])
    assert [(d.text, d.finish_reason) for d in outcome.deltas] == [("the ", "stop")]
    assert outcome.stopped == []  # the scheduler already finished it


def test_reassign_rebuilds_and_replays_from_offset_zero(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer)
    ids = tokenizer.encode("resumed 😀 text").ids
    message = Reassign("r", DetokenizeSpec(), pack_i32(PROMPT), pack_i32(ids[:-2]))
    outcome = table.reassign(message, trace="ctx")
    (delta,) = outcome.deltas
    # The ids end inside the emoji: the complete text before it is released.
    assert delta.offset == 0 and delta.text == "resumed "
    assert delta.completion_tokens == len(ids) - 2 and delta.finish_reason is None
    more = table.apply([output("r", ids[-2:], len(ids) - 2, "stop")])
    assert more.deltas[0].offset == len(delta.text)
    assert delta.text + more.deltas[0].text == "resumed 😀 text"


def test_reassign_of_a_finished_request_finishes_it(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer)
    ids = tokenizer.encode("all done").ids
    message = Reassign("r", DetokenizeSpec(stop=["done"]), pack_i32(PROMPT), pack_i32(ids))
    outcome = table.reassign(message)
    assert [(d.text, d.finish_reason) for d in outcome.deltas] == [("all ", "stop")]
    assert outcome.stopped == ["r"] and "r" not in table


def test_reassign_with_corrupt_ids_fails(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer)
    outcome = table.reassign(Reassign("r", DetokenizeSpec(), b"\x00", b""))
    assert outcome.failed[0].request_id == "r" and outcome.orphaned == ["r"]


def test_reassign_naming_an_unknown_tool_parser_fails_it(tokenizer: Tokenizer) -> None:
    """Found by the socket fuzzer: such a Reassign ended the tokenizer (ValueError)."""
    table = make_table(tokenizer)
    outcome = table.reassign(
        Reassign("r", DetokenizeSpec(tool_parser="\xf6\xf0"), pack_i32(PROMPT), b""))
    assert outcome.failed[0].request_id == "r" and "unknown tool call parser" in (
        outcome.failed[0].message)
    assert "r" not in table


def test_drop_all_forgets_everything(tokenizer: Tokenizer) -> None:
    table = make_table(tokenizer, "a", "b")
    assert sorted(s.request_id for s in table.drop_all()) == ["a", "b"]
    assert len(table) == 0
    assert table.apply([output("a", [70], 0)]).stragglers == 1


def test_resumptions_carry_the_ids_so_far_and_the_text_goes_on(tokenizer: Tokenizer) -> None:
    table = InflightRequests(tokenizer, vocab_size=tokenizer.get_vocab_size())
    sampling = SamplingParams(max_tokens=40, seed=9)
    spec = ResumeSpec(pack_i32(PROMPT), sampling, DetokenizeSpec(), priority=2,
                      cache_salt="s")
    table.admit("a", PROMPT, DetokenizeSpec(), trace="ctx-a", resume=spec)
    ids = tokenizer.encode("pause 😀 then resume").ids
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    first = table.apply([output("a", ids[:cut], 0)])  # ends inside the emoji
    # Reassigned by a scheduler that sent its sampling: resumable too; one that
    # did not: not resumable.
    table.reassign(Reassign("b", DetokenizeSpec(), pack_i32(PROMPT), pack_i32(ids[:2]),
                            sampling=SamplingParams(seed=4), priority=1))
    table.reassign(Reassign("old", DetokenizeSpec(), pack_i32(PROMPT), b""))
    resumed, lost = table.resumptions()
    assert [s.request_id for s in lost] == ["old"] and "old" not in table
    by_id = {submit.request_id: submit for submit, _ in resumed}
    a = by_id["a"]
    assert (a.sampling, a.priority, a.cache_salt, a.n, a.resumed) == (sampling, 2, "s", 1, True)
    assert list(unpack_i32(a.output_token_ids)) == ids[:cut]
    assert list(unpack_i32(a.prompt_token_ids)) == PROMPT
    b = by_id["b"]
    assert (b.sampling.seed, b.priority, list(unpack_i32(b.output_token_ids))) == (
        4, 1, ids[:2])
    # The new scheduler's outputs start at num_prior = cut; the held-back bytes
    # of the emoji complete it: no repeated or missing character.
    rest = table.apply([output("a", ids[cut:], cut, "length")])
    text = "".join(d.text for d in first.deltas + rest.deltas)
    assert text == tokenizer.decode(ids)
    assert rest.deltas[0].offset == len("".join(d.text for d in first.deltas))


def test_tool_calls_split_from_content_and_finish_as_tool_calls(tokenizer: Tokenizer) -> None:
    text = ('Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>')
    ids = tokenizer.encode(text).ids
    table = make_table(tokenizer, "r", spec=DetokenizeSpec(tool_parser="hermes"))
    deltas = [d for i, token in enumerate(ids)
              for d in table.apply([output("r", [token], i,
                                          "stop" if i == len(ids) - 1 else None)]).deltas]
    assert "".join(d.text for d in deltas) == "Checking."
    calls = [c for d in deltas for c in d.tool_calls]
    assert calls[0].name == "get_weather" and all(c.index == 0 for c in calls)
    assert "".join(c.arguments for c in calls) == '{"city": "Paris"}'
    assert deltas[-1].finish_reason == "tool_calls"
    # A replica that takes the request over replays the same split from offset 0.
    replay = make_table(tokenizer).reassign(
        Reassign("r", DetokenizeSpec(tool_parser="hermes"), pack_i32(PROMPT), pack_i32(ids),
                 "stop")).deltas
    assert [(d.text, d.tool_calls, d.finish_reason) for d in replay] == [
        ("Checking.", [c for d in replay for c in d.tool_calls], "tool_calls")]
    assert "".join(c.arguments for d in replay for c in d.tool_calls) == '{"city": "Paris"}'


def test_a_length_cut_keeps_its_finish_reason(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode('<tool_call>{"name": "f", "arguments": {"a": 1').ids
    table = make_table(tokenizer, "r", spec=DetokenizeSpec(tool_parser="hermes"))
    (delta,) = table.apply([output("r", ids, 0, "length")]).deltas
    assert delta.finish_reason == "length" and delta.text == ""
    assert [(c.name, c.arguments) for c in delta.tool_calls] == [("f", '{"a": 1')]
