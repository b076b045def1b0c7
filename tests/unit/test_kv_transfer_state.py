"""The pure transfer state machine (services/worker/kv_transfer/state.py), driven by
hand: a sender book and a receiver book exchange the messages the engine would
carry, with time passed in explicitly."""

from __future__ import annotations

import pytest

from services.worker.kv_transfer.state import (
    MAX_PARK_S,
    MAX_PARKED_BEGINS,
    Role,
    Transfer,
    TransferBook,
    TransferError,
    TransferState,
)
from shared.protocol.transfer import (
    KvBlockLayout,
    TransferAbort,
    TransferBegin,
    TransferChunk,
    TransferCredit,
)

LAYOUT = KvBlockLayout(2, 16, 2, 8, "bfloat16")
BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 2
PEER = b"sender-1"


def make_books(window: int = 2) -> tuple[TransferBook, TransferBook]:
    return TransferBook(LAYOUT, window), TransferBook(LAYOUT, window)


def start(sender: TransferBook, receiver: TransferBook, blocks: int, chunk_blocks: int = 2,
          timeout_s: float = 10.0) -> tuple[Transfer, Transfer]:
    out, begin = sender.start_send("t", "ipc://peer", list(range(blocks)), chunk_blocks, 0.0,
                                   timeout_s)
    into, answer = receiver.expect("t", list(range(100, 100 + blocks)), 0.0, timeout_s)
    assert answer is None
    credit = receiver.on_begin(PEER, begin, 0.0)
    assert credit == TransferCredit("t", 0, receiver.window)
    assert sender.on_credit(credit, BLOCK_BYTES, 0.0) is out
    return out, into


def deliver(sender: TransferBook, receiver: TransferBook, out: Transfer) -> list[TransferChunk]:
    """Send every chunk the credit allows and write it at the receiver."""
    chunks = []
    while (chunk := sender.next_chunk(out)) is not None:
        chunks.append(chunk)
    for chunk in chunks:
        into = receiver.check_chunk(PEER, chunk, chunk.count * BLOCK_BYTES, BLOCK_BYTES, 1.0)
        assert isinstance(into, Transfer)
        credit = receiver.chunk_written(into, chunk.count * BLOCK_BYTES, 1.0)
        assert credit is not None
        sender.on_credit(credit, BLOCK_BYTES, 1.0)
    return chunks


@pytest.mark.parametrize("blocks", [1, 16, 256])
def test_a_transfer_completes_on_both_sides_with_every_byte(blocks: int) -> None:
    sender, receiver = make_books()
    out, into = start(sender, receiver, blocks, chunk_blocks=8)
    sent = 0
    while not out.state.ended:
        chunks = deliver(sender, receiver, out)
        assert 0 < len(chunks) <= sender.window
        sent += len(chunks)
    assert sent == -(-blocks // 8)
    assert out.state is into.state is TransferState.DONE
    assert out.bytes_moved == into.bytes_moved == blocks * BLOCK_BYTES
    assert not sender.live and not receiver.live


def test_the_sender_never_exceeds_the_credit_window() -> None:
    sender, receiver = make_books(window=3)
    out, _ = start(sender, receiver, 20, chunk_blocks=1)
    chunks = []
    while (chunk := sender.next_chunk(out)) is not None:
        chunks.append(chunk)
    assert [c.seq for c in chunks] == [0, 1, 2]
    sender.on_credit(TransferCredit("t", 1, 3), BLOCK_BYTES, 0.5)
    assert sender.next_chunk(out) == TransferChunk("t", 3, 3, 1)
    assert sender.next_chunk(out) is None


def test_a_begin_before_expect_is_parked_and_answered_by_expect() -> None:
    sender, receiver = make_books()
    _, begin = sender.start_send("t", "ipc://peer", [1, 2, 3], 2, 0.0, 5.0)
    assert receiver.on_begin(PEER, begin, 0.0) is None
    into, answer = receiver.expect("t", [7, 8, 9], 0.1, 5.0)
    assert answer == TransferCredit("t", 0, 2, epoch=1)
    assert into.state is TransferState.RUNNING and into.peer == PEER


def test_eager_chunks_are_written_when_the_receiver_expected_the_id() -> None:
    sender, receiver = make_books()
    out, begin = sender.start_send("t", "ipc://peer", list(range(8)), 2, 0.0, 5.0, eager=2)
    into, _ = receiver.expect("t", list(range(10, 18)), 0.0, 5.0)
    eager = [sender.next_chunk(out), sender.next_chunk(out)]
    assert sender.next_chunk(out) is None and out.state is TransferState.PENDING
    credit = receiver.on_begin(PEER, begin, 0.0)
    assert credit == TransferCredit("t", 0, 2, epoch=0)
    credits = [credit]
    for chunk in eager:  # they follow the begin in the pipe
        assert chunk is not None
        assert receiver.check_chunk(PEER, chunk, 2 * BLOCK_BYTES, BLOCK_BYTES, 0.1) is into
        credits.append(receiver.chunk_written(into, 2 * BLOCK_BYTES, 0.1))
    sender.on_credit(credits[0], BLOCK_BYTES, 0.2)
    assert out.sent == 2 and out.epoch == 0  # nothing to send again
    for later in credits[1:]:
        assert later is not None
        sender.on_credit(later, BLOCK_BYTES, 0.2)
    assert out.acked == 2
    while not out.state.ended:
        deliver(sender, receiver, out)
    assert out.state is into.state is TransferState.DONE


def test_eager_chunks_of_a_parked_begin_are_dropped_and_sent_again() -> None:
    sender, receiver = make_books()
    out, begin = sender.start_send("t", "ipc://peer", list(range(6)), 2, 0.0, 5.0, eager=2)
    stale = [sender.next_chunk(out), sender.next_chunk(out)]
    assert receiver.on_begin(PEER, begin, 0.0) is None  # parked
    assert stale[0] is not None and stale[1] is not None
    assert receiver.check_chunk(PEER, stale[0], 2 * BLOCK_BYTES, BLOCK_BYTES, 0.0) is None
    into, credit = receiver.expect("t", list(range(10, 16)), 0.1, 5.0)
    assert isinstance(credit, TransferCredit) and credit.epoch == 1
    # The second eager chunk was still in the pipe: dropped, not a failure.
    assert receiver.check_chunk(PEER, stale[1], 2 * BLOCK_BYTES, BLOCK_BYTES, 0.1) is None
    assert into.state is TransferState.RUNNING
    sender.on_credit(credit, BLOCK_BYTES, 0.2)
    assert (out.sent, out.epoch) == (0, 1)
    again = sender.next_chunk(out)
    assert again == TransferChunk("t", 0, 0, 2, epoch=1)
    assert receiver.check_chunk(PEER, again, 2 * BLOCK_BYTES, BLOCK_BYTES, 0.3) is into
    first = receiver.chunk_written(into, 2 * BLOCK_BYTES, 0.3)
    assert first is not None
    sender.on_credit(first, BLOCK_BYTES, 0.3)
    while not out.state.ended:
        deliver(sender, receiver, out)
    assert out.state is into.state is TransferState.DONE
    assert into.bytes_moved == out.bytes_moved == 6 * BLOCK_BYTES


def test_parked_begins_are_bounded_and_expire() -> None:
    _, receiver = make_books()
    for i in range(MAX_PARKED_BEGINS):
        assert receiver.on_begin(PEER, TransferBegin(f"t{i}", 1, 1, LAYOUT, 1.0), 0.0) is None
    refused = receiver.on_begin(PEER, TransferBegin("one-more", 1, 1, LAYOUT, 1.0), 0.0)
    assert isinstance(refused, TransferAbort) and "busy" in refused.reason
    receiver.expire(2.0)
    assert not receiver.parked


@pytest.mark.parametrize("timeout_s", [float("inf"), 1e300, float("nan"), -1.0])
def test_a_begin_parks_at_most_max_park_s_whatever_its_timeout(timeout_s: float) -> None:
    _, receiver = make_books()
    receiver.on_begin(PEER, TransferBegin("t", 1, 1, LAYOUT, timeout_s), 0.0)
    receiver.expire(MAX_PARK_S)
    assert not receiver.parked


@pytest.mark.parametrize(
    ("begin", "problem"),
    [
        (TransferBegin("t", 3, 2, KvBlockLayout(2, 16, 2, 8, "float32")), "layout"),
        (TransferBegin("t", 4, 2, LAYOUT), "expects 3"),
        (TransferBegin("t", 3, 0, LAYOUT), "chunk_blocks"),
    ],
)
def test_a_begin_that_does_not_fit_fails_the_transfer(begin: TransferBegin, problem: str) -> None:
    _, receiver = make_books()
    into, _ = receiver.expect("t", [1, 2, 3], 0.0, 5.0)
    answer = receiver.on_begin(PEER, begin, 0.0)
    assert isinstance(answer, TransferAbort) and problem in answer.reason
    assert into.state is TransferState.FAILED and problem in into.error


@pytest.mark.parametrize(
    ("identity", "chunk", "payload", "problem"),
    [
        (b"intruder", TransferChunk("t", 0, 0, 2), 2 * BLOCK_BYTES, "begin was not accepted"),
        (PEER, TransferChunk("t", 1, 2, 2), 2 * BLOCK_BYTES, "out of order"),
        (PEER, TransferChunk("t", 0, 1, 2), 2 * BLOCK_BYTES, "covers blocks"),
        (PEER, TransferChunk("t", 0, 0, 2), 2 * BLOCK_BYTES - 1, "carries"),
    ],
)
def test_a_bad_chunk_fails_the_receiver_and_is_never_complete(
        identity: bytes, chunk: TransferChunk, payload: int, problem: str) -> None:
    sender, receiver = make_books()
    _, into = start(sender, receiver, 6)
    answer = receiver.check_chunk(identity, chunk, payload, BLOCK_BYTES, 1.0)
    assert isinstance(answer, TransferAbort) and problem in answer.reason
    assert into.state is TransferState.FAILED and into.acked == 0


def test_a_chunk_for_an_unknown_transfer_is_answered_and_one_for_an_ended_is_dropped() -> None:
    sender, receiver = make_books()
    answer = receiver.check_chunk(PEER, TransferChunk("nope", 0, 0, 1), BLOCK_BYTES,
                                  BLOCK_BYTES, 0.0)
    assert isinstance(answer, TransferAbort)
    start(sender, receiver, 4)
    receiver.cancel("t", 0.5)
    assert receiver.check_chunk(PEER, TransferChunk("t", 0, 0, 2), 2 * BLOCK_BYTES,
                                BLOCK_BYTES, 1.0) is None
    late = receiver.on_begin(PEER, TransferBegin("t", 4, 2, LAYOUT), 1.0)
    assert isinstance(late, TransferAbort) and late.cancelled


def test_a_begin_after_the_receiver_cancelled_learns_it_was_a_cancel() -> None:
    sender, receiver = make_books()
    out, begin = sender.start_send("t", "ipc://peer", [1, 2], 1, 0.0, 5.0, eager=2)
    receiver.expect("t", [3, 4], 0.0, 5.0)
    receiver.cancel("t", 0.1)  # before its begin came
    answer = receiver.on_begin(PEER, begin, 0.2)
    assert isinstance(answer, TransferAbort) and answer.cancelled
    sender.on_abort(answer, None, 0.3)
    assert out.state is TransferState.CANCELLED


def test_a_timeout_fails_either_side_mid_transfer_but_not_before_its_deadline() -> None:
    sender, receiver = make_books(window=1)
    out, into = start(sender, receiver, 8, timeout_s=5.0)
    deliver(sender, receiver, out)
    assert sender.expire(4.9) == [] and receiver.expire(4.9) == []
    assert sender.expire(5.0) == [out] and receiver.expire(5.0) == [into]
    for transfer in (out, into):
        assert transfer.state is TransferState.FAILED
        assert "timed out" in transfer.error and "1/4 chunks" in transfer.error
    assert into.acked == 1 and into.state is not TransferState.DONE


def test_cancel_is_idempotent_and_the_peer_learns_it_was_cancelled() -> None:
    sender, receiver = make_books()
    out, into = start(sender, receiver, 4)
    assert receiver.cancel("t", 1.0) is into
    assert receiver.cancel("t", 1.0) is None
    assert into.state is TransferState.CANCELLED
    sender.on_abort(TransferAbort("t", "cancelled", cancelled=True), None, 1.0)
    assert out.state is TransferState.CANCELLED and "receiver cancelled" in out.error
    assert sender.next_chunk(out) is None


def test_an_abort_from_another_peer_is_ignored_by_the_receiver() -> None:
    sender, receiver = make_books()
    _, into = start(sender, receiver, 4)
    assert receiver.on_abort(TransferAbort("t", "x"), b"intruder", 1.0) is None
    assert into.state is TransferState.RUNNING
    assert receiver.on_abort(TransferAbort("t", "sender died"), PEER, 1.0) is into
    assert into.state is TransferState.FAILED


def test_a_write_that_finishes_after_cancel_does_not_complete_the_transfer() -> None:
    sender, receiver = make_books()
    out, into = start(sender, receiver, 2)
    chunk = sender.next_chunk(out)
    assert chunk is not None
    checked = receiver.check_chunk(PEER, chunk, 2 * BLOCK_BYTES, BLOCK_BYTES, 1.0)
    assert checked is into
    receiver.cancel("t", 1.0)
    assert receiver.chunk_written(into, 2 * BLOCK_BYTES, 1.1) is None
    assert into.state is TransferState.CANCELLED and into.bytes_moved == 0


def test_a_credit_beyond_what_was_sent_fails_the_sender() -> None:
    sender, receiver = make_books()
    out, _ = start(sender, receiver, 4)
    sender.on_credit(TransferCredit("t", 2, 2), BLOCK_BYTES, 1.0)
    assert out.state is TransferState.FAILED and "bad credit" in out.error


@pytest.mark.parametrize(
    ("blocks", "timeout_s", "problem"),
    [([], 1.0, "no blocks"), ([1, 1], 1.0, "twice"), ([1], 0.0, "positive")],
)
def test_requests_the_book_cannot_start_are_refused(
        blocks: list[int], timeout_s: float, problem: str) -> None:
    book = TransferBook(LAYOUT, 2)
    with pytest.raises(TransferError, match=problem):
        book.expect("t", blocks, 0.0, timeout_s)
    with pytest.raises(TransferError, match=problem):
        book.start_send("t", "ipc://p", blocks, 1, 0.0, timeout_s)


def test_an_id_in_progress_is_refused_and_reusable_once_ended() -> None:
    book = TransferBook(LAYOUT, 2)
    transfer, _ = book.start_send("t", "ipc://p", [1], 1, 0.0, 1.0)
    assert transfer.role is Role.SEND
    with pytest.raises(TransferError, match="already in progress"):
        book.expect("t", [2], 0.0, 1.0)
    book.cancel("t", 0.1)
    again, _ = book.expect("t", [2], 0.2, 1.0)
    assert again.state is TransferState.PENDING
    assert book.next_deadline() == pytest.approx(1.2)


def test_an_nccl_transfer_needs_an_nccl_receiver_and_chunks_without_payload() -> None:
    plain = TransferBook(LAYOUT, 2)
    plain.expect("t", [1, 2], 0.0, 5.0)
    refused = plain.on_begin(PEER, TransferBegin("t", 2, 1, LAYOUT, nccl_store="/tmp/s"), 0.0)
    assert isinstance(refused, TransferAbort) and "NCCL" in refused.reason

    sender, receiver = TransferBook(LAYOUT, 2, nccl=True), TransferBook(LAYOUT, 2, nccl=True)
    out, begin = sender.start_send("t", "ipc://p", [1, 2, 3], 1, 0.0, 5.0, nccl_store="/tmp/s")
    assert begin.nccl_store == "/tmp/s" and out.nccl_store == "/tmp/s"
    into, _ = receiver.expect("t", [4, 5, 6], 0.0, 5.0)
    assert receiver.on_begin(PEER, begin, 0.0) == TransferCredit("t", 0, 2)
    assert into.nccl_store == "/tmp/s"
    ok = receiver.check_chunk(PEER, TransferChunk("t", 0, 0, 1), None, BLOCK_BYTES, 1.0)
    assert ok is into
    receiver.chunk_written(into, BLOCK_BYTES, 1.0)
    framed = receiver.check_chunk(PEER, TransferChunk("t", 1, 1, 1), BLOCK_BYTES, BLOCK_BYTES,
                                  1.0)
    assert isinstance(framed, TransferAbort) and "payload on an NCCL" in framed.reason


def test_a_chunk_without_payload_fails_a_frame_transfer() -> None:
    sender, receiver = make_books()
    _, into = start(sender, receiver, 2)
    answer = receiver.check_chunk(PEER, TransferChunk("t", 0, 0, 2), None, BLOCK_BYTES, 1.0)
    assert isinstance(answer, TransferAbort) and "without a payload" in answer.reason
    assert into.state is TransferState.FAILED


def test_a_parked_begin_refused_at_expect_is_answered_to_its_sender() -> None:
    _, receiver = make_books()
    wrong = TransferBegin("t", 5, 1, LAYOUT)  # 5 blocks; the receiver will expect 2
    assert receiver.on_begin(PEER, wrong, 0.0) is None
    into, answer = receiver.expect("t", [1, 2], 0.1, 5.0)
    assert isinstance(answer, TransferAbort) and "expects 2" in answer.reason
    assert into.state is TransferState.FAILED and into.peer == PEER
