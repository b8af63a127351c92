"""T5 and BERT as compiled MindSpore graphs (dualtune/backends/mindspore/graphs/)
against the op-by-op path they replace: the same loss, gradients, teacher-forced logits, greedy
generations and classification logits; dropout seeded and resumable; padded shapes exact; one compile
per bucketed shape; models they do not cover run op by op."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import first_batch, is_key_bias, prepared, steps_on_one_batch

T5_METHODS = {
    "prefix": ["peft.method=prefix"],
    "lora": ["peft.method=lora", "peft.lora.target_modules=[q,v,wi]"],
    "bitfit": ["peft.method=bitfit"],
    "full": ["peft.method=none"],
}
# |graph - op by op| per gradient tensor, relative to its largest entry (measured: up to 5e-6 on the
# t5-small config with LoRA, 3e-5 on the tiny T5 after 15 steps; float32 sums in another order)
GRAD_TOL = 1e-4


def t5(ms, tiny_t5, fin_data, *overrides):
    return prepared(
        ms,
        "t5_lora.yaml",
        f"model.name_or_path={tiny_t5}",
        f"data.source={fin_data}",
        "train.eval_every=1000",
        "optim.weight_decay=0",
        *overrides,
    )


def on_path(ms, model, monkeypatch, graph: bool):
    monkeypatch.setenv("DUALTUNE_MINDSPORE_GRAPH", "1" if graph else "0")
    model._dualtune_graph = None  # built again for this setting
    compiled = ms.compiled(model)
    assert (compiled is not None) == graph
    return compiled


def outputs(ms, prep, batch):
    """Loss and gradients (dropout off), teacher-forced loss and logits, greedy generation."""
    ms.set_training(prep.model, False)
    loss, grads = ms.value_and_grad(prep.model, prep.params, batch)
    eval_loss, logits = ms.eval_batch(prep.model, batch)
    generated = ms.generate(prep.model, batch, 3)
    return ms.to_float(loss), [ms.to_numpy(g).copy() for g in grads], eval_loss, logits, generated


def on_both_paths(ms, prep, monkeypatch, outputs_of, steps: int, lr: float):
    """``outputs_of(ms, prep, batch)`` op by op, then as graphs, on the first batch (5 rows: padded
    to 8 rows and a bucketed length in the graph), after ``steps`` AdamW steps op by op."""
    on_path(ms, prep.model, monkeypatch, graph=False)
    steps_on_one_batch(ms, prep, steps=steps, lr=lr)
    batch = first_batch(ms, prep)
    assert batch["input_ids"].shape[0] == 5 and batch["input_ids"].shape[1] not in (8, 16, 24, 32)
    plain = outputs_of(ms, prep, batch)
    on_path(ms, prep.model, monkeypatch, graph=True)
    return plain, outputs_of(ms, prep, batch)


def assert_same_losses_and_gradients(prep, graph, plain):
    """(loss, gradients, evaluation loss, ...) of the graph against op by op's."""
    np.testing.assert_allclose(graph[0], plain[0], rtol=1e-6)
    assert len(graph[1]) == len(plain[1]) == len(prep.params)
    for name, g, p in zip(prep.trainable, graph[1], plain[1]):
        assert g.shape == p.shape
        if not is_key_bias(name):  # exactly zero but for round-off (helpers.is_key_bias)
            np.testing.assert_allclose(g, p, rtol=0, atol=GRAD_TOL * float(np.abs(p).max()), err_msg=name)
    np.testing.assert_allclose(graph[2], plain[2], rtol=1e-6)


@pytest.mark.parametrize("method", list(T5_METHODS))
def test_graph_gives_what_op_by_op_gives(ms, tiny_t5, fin_data, monkeypatch, method):
    prep = t5(ms, tiny_t5, fin_data, *T5_METHODS[method], "train.batch_size=5")
    # trained a little first, so that greedy decoding writes words, not one token everywhere
    plain, graph = on_both_paths(ms, prep, monkeypatch, outputs, steps=15, lr=3e-2)
    assert_same_losses_and_gradients(prep, graph, plain)
    assert graph[3].shape == plain[3].shape
    np.testing.assert_allclose(graph[3], plain[3], rtol=0, atol=1e-5 * float(np.abs(plain[3]).max()))
    assert graph[4].shape == plain[4].shape and graph[4].dtype.kind == "i"
    np.testing.assert_array_equal(graph[4], plain[4])
    assert len(set(plain[4][:, 1:].ravel().tolist())) > 1, "decoding wrote one token everywhere"


CLASSIFIERS = {
    "bert-lora": [],  # the demo's: every query, key, value and dense layer, the pooler's among them
    "bert-bitfit": ["peft.method=bitfit"],
    "bert-full": ["peft.method=none"],
    "bert-class_weights": ["loss.class_weights=balanced"],
    "llama-lora": ["peft.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"],
    "llama-full": ["peft.method=none", "loss.class_weights=balanced"],
}


def classifier(ms, model_dir, fin_data, *overrides):
    """The demo recipe on a tiny model (a decoder pads with its end token)."""
    decoder = "llama" in model_dir
    return prepared(
        ms,
        "minilm_demo.yaml",
        f"model.name_or_path={model_dir}",
        f"data.source={fin_data}",
        "data.max_rows=null",
        "schedule.warmup_ratio=null",
        "optim.weight_decay=0",
        *(["model.pad_token_as_eos=true"] if decoder else []),
        *overrides,
    )


def classifier_outputs(ms, prep, batch):
    """Loss and gradients (dropout off), evaluation loss and logits, logits without labels."""
    ms.set_training(prep.model, False)
    loss, grads = ms.value_and_grad(prep.model, prep.params, batch)
    eval_loss, logits = ms.eval_batch(prep.model, batch)
    no_labels = ms.eval_batch(prep.model, {k: v for k, v in batch.items() if k != "labels"})
    return ms.to_float(loss), [ms.to_numpy(g).copy() for g in grads], eval_loss, logits, no_labels


@pytest.mark.parametrize("case", list(CLASSIFIERS))
def test_classifier_graph_gives_what_op_by_op_gives(ms, tiny_bert, tiny_llama, fin_data, monkeypatch, case):
    model_dir = tiny_llama if case.startswith("llama") else tiny_bert
    prep = classifier(ms, model_dir, fin_data, *CLASSIFIERS[case], "train.batch_size=5")
    # trained a little first, away from the initial head
    plain, graph = on_both_paths(ms, prep, monkeypatch, classifier_outputs, steps=5, lr=1e-2)
    assert_same_losses_and_gradients(prep, graph, plain)
    assert graph[3].shape == plain[3].shape == (5, 3)
    np.testing.assert_allclose(graph[3], plain[3], rtol=0, atol=1e-5 * float(np.abs(plain[3]).max()))
    assert graph[4][0] is None and plain[4][0] is None
    np.testing.assert_allclose(graph[4][1], plain[4][1], rtol=0, atol=1e-5 * float(np.abs(plain[3]).max()))


def test_graph_dropout_is_seeded_and_restorable(ms, tiny_t5, fin_data, monkeypatch):
    prep = t5(ms, tiny_t5, fin_data, "peft.method=lora", "peft.lora.dropout=0.1")
    compiled = on_path(ms, prep.model, monkeypatch, graph=True)
    batch = first_batch(ms, prep)
    ms.set_training(prep.model, True)
    ms.seed(7)
    first = ms.to_float(ms.value_and_grad(prep.model, prep.params, batch)[0])
    state = ms.rng_state()
    second = ms.to_float(ms.value_and_grad(prep.model, prep.params, batch)[0])
    ms.set_rng_state(state)
    again = ms.to_float(ms.value_and_grad(prep.model, prep.params, batch)[0])
    ms.seed(7)
    replay = ms.to_float(ms.value_and_grad(prep.model, prep.params, batch)[0])
    ms.set_training(prep.model, False)
    no_dropout = ms.to_float(ms.value_and_grad(prep.model, prep.params, batch)[0])
    assert first != second  # new masks each step
    assert again == second and replay == first  # restored state, same seed: the same bytes
    assert no_dropout not in (first, second)
    # model dropout everywhere it runs, LoRA's on each adapted projection's input
    sites = [s for s, _, _ in compiled.plan.dropout_sites(8, 16, 3)]
    assert (
        "encoder.embed" in sites and "decoder.0.cross.weights" in sites and "encoder.1.self.v.lora" in sites
    )


def test_masks_drawn_on_threads_are_the_masks_drawn_one_by_one(ms):
    """The graphs take a step's masks from ``keep_scales`` (threads), op by op from ``keep_scale``:
    the same bytes in the same order, and the generator's state advanced alike."""
    from dualtune.backends.mindspore.step import DropoutRNG

    sites = [((8, 16), 0.1), ((3,), 0.5), ((2, 4, 5), 0.9), ((64, 64), 0.1), ((1,), 0.3)]
    one_by_one, threaded = DropoutRNG(), DropoutRNG()
    for rng in (one_by_one, threaded):
        rng.manual_seed(3)
        rng.keep_scale((2,), 0.5)  # a draw before: the masks start at call 1
    want = [one_by_one.keep_scale(shape, p) for shape, p in sites]
    got = threaded.keep_scales(sites)
    assert len(got) == len(sites)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype == np.float32 and np.array_equal(w, g)
    assert np.array_equal(threaded.get_state(), one_by_one.get_state())
    assert np.array_equal(threaded.keep_scale((16,), 0.5), one_by_one.keep_scale((16,), 0.5))
    assert threaded.keep_scales([]) == []


@pytest.fixture
def no_graphs_yet(monkeypatch):
    """The process's shared graphs set aside: other tests may have compiled these shapes."""
    from dualtune.backends.mindspore.graphs import base as graph

    monkeypatch.setattr(graph, "_GRAPHS", {})
    monkeypatch.setattr(graph, "_COMPILED", set())


def test_one_compile_per_bucketed_shape(ms, tiny_t5, fin_data, monkeypatch, no_graphs_yet):
    prep = t5(ms, tiny_t5, fin_data, "peft.method=prefix")
    on_path(ms, prep.model, monkeypatch, graph=True)
    ms.set_training(prep.model, False)
    rng = np.random.default_rng(0)

    def step(rows, length):
        batch = {
            "input_ids": rng.integers(5, 100, (rows, length)),
            "attention_mask": np.ones((rows, length), np.int64),
            "labels": rng.integers(5, 100, (rows, 2)),
        }
        ms.value_and_grad(prep.model, prep.params, ms.to_tensors(batch))

    for rows, length in [(8, 17), (8, 24), (7, 20), (5, 23), (8, 25)]:  # buckets: 8 x 24 four times, 8 x 32
        step(rows, length)
    stats = prep.model._dualtune_compile_stats
    assert stats["compiles"] == 2
    assert ms.compile_seconds(prep.model) == stats["compile_seconds"] > 0


def test_models_of_one_structure_share_graphs_and_no_others(
    ms, tiny_t5, fin_data, monkeypatch, no_graphs_yet
):
    """A second LoRA model in the process compiles nothing; one whose alpha differs (a constant in
    the graph, the case MindSpore's own compile cache gets wrong) compiles its own, and both give
    the op-by-op gradients."""
    lora = ("peft.method=lora", "train.batch_size=8")
    first = t5(ms, tiny_t5, fin_data, *lora)
    second = t5(ms, tiny_t5, fin_data, *lora, "train.seed=1")
    other_alpha = t5(ms, tiny_t5, fin_data, *lora, "peft.lora.alpha=64")
    for prep in (first, second, other_alpha):
        batch = first_batch(ms, prep)
        ms.set_training(prep.model, False)
        on_path(ms, prep.model, monkeypatch, graph=False)
        _, plain = ms.value_and_grad(prep.model, prep.params, batch)
        plain = [ms.to_numpy(g).copy() for g in plain]
        on_path(ms, prep.model, monkeypatch, graph=True)
        _, grads = ms.value_and_grad(prep.model, prep.params, batch)
        assert any(np.abs(p).max() > 0 for p in plain)
        for name, g, p in zip(prep.trainable, grads, plain):
            np.testing.assert_allclose(
                ms.to_numpy(g), p, rtol=0, atol=GRAD_TOL * float(np.abs(p).max()), err_msg=name
            )
    assert ms.compile_seconds(first.model) > 0
    assert ms.compile_seconds(second.model) is None
    assert ms.compile_seconds(other_alpha.model) > 0


def test_models_not_written_as_graphs_run_op_by_op(ms, tiny_t5, tiny_bert, tiny_llama, fin_data, monkeypatch):
    ia3 = t5(ms, tiny_t5, fin_data, "peft.method=ia3")
    assert ms.compiled(ia3.model) is None
    assert ms.compiled(classifier(ms, tiny_bert, fin_data, "peft.method=prefix").model) is None
    llama = classifier(ms, tiny_llama, fin_data, "peft.method=prefix")
    assert ms.compiled(llama.model) is None
    checkpointed = t5(ms, tiny_t5, fin_data, "peft.method=lora", "train.gradient_checkpointing=true")
    assert ms.compiled(checkpointed.model) is None
    # BERT's graphs are there (the demo's LoRA) but off unless asked for; T5's are on by default
    monkeypatch.delenv("DUALTUNE_MINDSPORE_GRAPH", raising=False)
    demo = classifier(ms, tiny_bert, fin_data)
    assert ms.compiled(demo.model) is None
    assert ms.compiled(t5(ms, tiny_t5, fin_data, "peft.method=lora").model) is not None
    monkeypatch.setenv("DUALTUNE_MINDSPORE_GRAPH", "1")
    demo.model._dualtune_graph = None
    assert ms.compiled(demo.model) is not None


def test_graph_switch_refuses_anything_but_0_or_1(ms, monkeypatch):
    """Before anything loads: "false" would otherwise turn every architecture's graphs on."""
    from dualtune.backends import mindspore as mindspore_backend
    from dualtune.errors import BackendError

    monkeypatch.setenv("DUALTUNE_MINDSPORE_GRAPH", "false")
    with pytest.raises(BackendError) as refused:
        mindspore_backend.create("cpu")
    assert str(refused.value) == (
        "DUALTUNE_MINDSPORE_GRAPH=false: expected 0 (op by op) or 1 (every model written as graphs); "
        "unset, each model's default"
    )
