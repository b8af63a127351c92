"""train.gradient_checkpointing on MindSpore: mindtorch's checkpoint only calls the layer, so the
backend runs transformers' checkpointed layers under MindSpore's own recompute (compat.py). The same
gradients and losses as without it (the torch suite's cases, tests/test_gradient_checkpointing.py), and
each layer really runs again in the backward pass, replaying its dropout masks."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import (
    CHECKPOINT_CASES,
    assert_same_gradients,
    gradients_with_checkpointing,
    run_losses_with_checkpointing,
)


@pytest.mark.parametrize("kind,method", list(CHECKPOINT_CASES))
def test_checkpointing_gives_the_same_gradients(ms, tiny_t5, tiny_bert, fin_data, kind, method):
    model_dir = tiny_t5 if kind == "t5" else tiny_bert
    plain = gradients_with_checkpointing(ms, kind, method, model_dir, fin_data, on=False)
    checkpointed = gradients_with_checkpointing(ms, kind, method, model_dir, fin_data, on=True)
    assert_same_gradients(plain, checkpointed)


def test_checkpointed_run_matches_plain_run(ms, tiny_t5, fin_data):
    plain, calls = run_losses_with_checkpointing(ms, tiny_t5, fin_data, on=False)
    checkpointed, ck_calls = run_losses_with_checkpointing(ms, tiny_t5, fin_data, on=True)
    assert (calls, ck_calls) == (4, 8)  # one forward per step; with checkpointing one more in backward
    assert plain[-1] < plain[0]
    np.testing.assert_allclose(checkpointed, plain, rtol=1e-6)


@pytest.fixture(autouse=True)
def op_by_op(monkeypatch):
    """Checkpointing runs op by op (the compiled graphs keep their own activations): the plain side
    too, so both count the layer's calls through the same hooks."""
    monkeypatch.setenv("DUALTUNE_MINDSPORE_GRAPH", "0")
