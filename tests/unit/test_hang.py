"""kimi.trainer.hang: which errors are a collective's timeout, and the one line that reports it."""

from kimi.trainer.hang import CollectiveTimeout, as_collective_timeout

GLOO = "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 15000ms for recv operation to complete"


def test_a_gloo_timeout_becomes_one_line_naming_rank_step_and_checkpoint():
    e = as_collective_timeout(RuntimeError(GLOO), 1, 7, 15.0, "checkpoints/latest (step_000006)")
    assert isinstance(e, CollectiveTimeout) and "\n" not in str(e)
    assert str(e) == (
        "rank 1: a collective timed out after 15 s at step 7 (parallel.timeout_s; Timed out waiting 15000ms for "
        "recv operation to complete): another rank is hung or dead; the job stops so a restart can resume from "
        "checkpoints/latest (step_000006)"
    )


def test_other_errors_are_left_alone():
    assert as_collective_timeout(RuntimeError("Connection closed by peer [127.0.0.1]:1234"), 0, 1, 15, "x") is None
    assert as_collective_timeout(ValueError("timed out"), 0, 1, 15, "x") is None  # not a backend's error
