"""torch -> ONNX graphs for the onnxruntime engine (model/engine.py), validated by the ONNX checker.

CALM is served as three graphs, the discrete baseline as one:

- `calm_backbone.onnx` step graph: (chunks [B, T, K], attention_mask [B, S+T],
  noise [B, N, noise_dim], past_key_values.N.key/value [B, H, S, hd]) -> (hidden [B, d] of the
  last position, tokens [B, N, K], present.N.key/value [B, H, T, hd] of the T new positions).
  T = the whole prompt is the prefill, T = 1 a decode step. The past is the engine's
  preallocated cache: S slots, of which the mask marks the filled ones (left pads and
  not-yet-written slots are 0). The sampler is fused in: `tokens` are the next chunks of the N
  noise samples, so at T = 1 (N = 1) a generative step is one call; the temperature samplers
  pass N = 0 and draw through `calm_sampler.onnx`.
- `calm_sampler.onnx`: (hidden [B, d], noise [B, N, noise_dim]) -> (latents [B, N, latent],
  tokens [B, N, K]): the energy head and the autoencoder's decoder for N noise samples per row.
  Noise is an input, so the engine's numpy generators seed it per request.
- `calm_encoder.onnx`: chunks [B, K] -> (mean, log_std) [B, latent].
- `ar_backbone.onnx`: (input_ids [B, T], attention_mask, temperature [], uniform [B, N], past)
  -> (logits [B, V] of the last position, tokens [B, N] sampled from softmax(logits / T) by
  inverse CDF on the uniforms (N = 0 for greedy), present).

The TorchScript exporter (`dynamo=False`, opset 17) keeps batch, prompt and past lengths dynamic.
It has no symbolic for `aten::rms_norm` at opset 17, and `scaled_dot_product_attention` exported
to a graph 20-40 % slower than plain matmul-softmax-matmul; a `present = cat(past, new)` cache
also copies the whole cache at every step (a third of an AR decode step at batch 32 in
onnxruntime). So the trace runs the unchanged model code with two swaps (`serving_ops`): RMSNorm
as its formula, and a hand-written attention that reads the cache without copying it and returns
only the new keys/values. At batch 1 a float32 step is bound by streaming its weights from
memory (~28 GB/s on one core) plus a per-node cost, so the step graphs also fold CALM's largest
matrix into a lookup table (`_ChunkEmbedding`) and carry the sampling that would otherwise be a
second call (CALM) or numpy work (AR) per step.
"""

import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from model.ar import ARModel
from model.backbone import Attention
from model.bundle import Bundle, write_bundle
from model.calm import CALM
from model.config import ARConfig, CALMConfig, config_to_dict
from model.flops import inference_flops_per_token
from model.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, Tokenizer

OPSET = 17
GRAPH_FILES = {
    "calm_backbone": "calm_backbone.onnx",
    "calm_sampler": "calm_sampler.onnx",
    "calm_encoder": "calm_encoder.onnx",
    "ar_backbone": "ar_backbone.onnx",
}


def _rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """P with x @ P = cat(x2, x1) for x = cat(x1, x2): one MatMul instead of slices and a concat
    (exact: every output is a single input times 1)."""
    half = head_dim // 2
    return torch.eye(head_dim).roll(half, dims=0)


def _cache_reading_attention(
    self: Attention, x: torch.Tensor, cos, sin, mask: torch.Tensor, past
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention.forward for the serving graph: the same result with fewer, cheaper nodes.

    - The past is read, never copied: scores against the past keys and against the T new keys
      are computed separately and only the small score matrix is concatenated; the layer
      returns the new positions' keys/values alone, which the engine writes into its
      preallocated cache.
    - Every shape comes from the rotary tables and the mask that all layers share (and the
      rotation is x * cos + (x @ P) * sin with a signed sin table), so onnxruntime's
      common-subexpression elimination computes them once per step instead of once per layer:
      a third fewer nodes, which is what a batch-1 step pays for.
    `mask` [B, 1, T, S+T] is the backbone's boolean mask (True = may attend).
    """
    b, t, h = cos.shape[0], cos.shape[2], self.n_heads
    qk, v = self.qkv(x).view(b, t, 3 * h, self.head_dim).transpose(1, 2).split([2 * h, h], 1)
    cos2, sin2 = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    swap = _rotate_half_matrix(self.head_dim).to(x.dtype)
    q, k = (qk * cos2 + (qk @ swap) * sin2).split([h, h], 1)  # q and k rotated in one go
    past_k, past_v = past
    s = mask.shape[-1] - t  # past slots, from the shared mask's shape
    q = q * (1.0 / math.sqrt(self.head_dim))
    scores = torch.cat((q @ past_k.transpose(-2, -1), q @ k.transpose(-2, -1)), dim=-1)
    p = scores.masked_fill(~mask, torch.finfo(x.dtype).min).softmax(dim=-1)
    y = p[..., :s] @ past_v + p[..., s:] @ v
    return self.proj(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)), (k, v)


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x if weight is None else x * weight


@contextmanager
def serving_ops() -> Iterator[None]:
    """Trace the cache-reading attention and RMSNorm as its formula (see the module docstring)."""
    with (
        mock.patch.object(Attention, "forward", _cache_reading_attention),
        mock.patch.object(F, "rms_norm", _rms_norm),
    ):
        yield


def _cache_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return past, present


class _ChunkEmbedding(nn.Module):
    """CALM.embed_chunks with the compressor's first Linear folded into the embedding table.

    Linear(flatten(wte[c_1..c_K])) = b + sum_j W_j wte[c_j], so a [K, vocab, 2d] table of the
    products W_j wte[v] turns that matmul into K row gathers: a batch-1 step streams its weights
    from memory, and this one is the largest matrix of the step (K * d * 2d floats).
    """

    def __init__(self, model: CALM):
        super().__init__()
        first, k = model.compress[0], model.config.k
        wte = model.backbone.wte.weight.double()
        w = first.weight.double().view(first.out_features, k, wte.shape[1])
        table = torch.einsum("vc,okc->kvo", wte, w).float()  # products in float64, rounded once
        self.register_buffer("table", table.reshape(k * wte.shape[0], -1))
        self.register_buffer("offsets", torch.arange(k) * wte.shape[0])
        self.bias, self.rest = first.bias, model.compress[1:]

    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        return self.rest(self.table[chunks + self.offsets].sum(-2) + self.bias)


class _Step(nn.Module):
    """Backbone step over embedded inputs: the last position's output and the new keys/values."""

    def __init__(self, model: CALM | ARModel):
        super().__init__()
        self.model = model
        self.embed = _ChunkEmbedding(model) if isinstance(model, CALM) else model.embed_chunks

    def step(self, inputs, attention_mask, past_flat) -> tuple[torch.Tensor, list[torch.Tensor]]:
        past = list(zip(past_flat[0::2], past_flat[1::2]))
        x = self.embed(inputs if inputs.dim() == 3 else inputs[..., None])
        hidden, present = self.model.backbone(
            x, attention_mask=attention_mask, past_key_values=past
        )
        last = hidden[:, -1]
        out = self.model.lm_head(last) if isinstance(self.model, ARModel) else last
        return out, [t for kv in present for t in kv]


class _CALMStep(_Step):
    """The CALM step with the sampler fused in: the chunks of N noise samples per row too.

    At T = 1 (one sample) a generative step is one graph call instead of two; the temperature
    samplers pass N = 0 and draw through the sampler graph.
    """

    def forward(self, chunks, attention_mask, noise, *past_flat):
        hidden, present = self.step(chunks, attention_mask, past_flat)
        latents = self.model.head(hidden, noise)
        return (hidden, self.model.autoencoder.decode(latents).argmax(-1), *present)


class _ARStep(_Step):
    """The AR step with sampling fused in: a token from softmax(logits / T) for each of N
    uniforms per row, by inverse CDF as model/generate.py's ar_next_tokens (N = 0 for greedy)."""

    def forward(self, input_ids, attention_mask, temperature, uniform, *past_flat):
        logits, present = self.step(input_ids, attention_mask, past_flat)
        z = logits / temperature
        cdf = (z - z.max(-1, keepdim=True).values).exp().cumsum(-1)
        below = cdf[:, None, :] <= (uniform * cdf[:, -1:])[..., None]
        return (logits, below.sum(-1).clamp(max=cdf.shape[-1] - 1), *present)


class _Sampler(nn.Module):
    def __init__(self, model: CALM):
        super().__init__()
        self.model = model

    def forward(self, hidden, noise):
        latents = self.model.head(hidden, noise)
        return latents, self.model.autoencoder.decode(latents).argmax(-1)


class _Encoder(nn.Module):
    def __init__(self, model: CALM):
        super().__init__()
        self.autoencoder = model.autoencoder

    def forward(self, chunks):
        return self.autoencoder.encode(chunks)


def _export(module: nn.Module, args: tuple, path: Path, inputs, outputs, dynamic) -> Path:
    module.eval()
    with torch.no_grad(), serving_ops():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _export_step(model: CALM | ARModel, inputs: torch.Tensor, first: str, out: str, path: Path):
    """Trace with B=2, T=3, past 5 (and 3 noise samples) so that no dimension is specialised."""
    cfg = model.config.backbone
    layers, heads, head_dim = cfg.n_layers, cfg.n_heads, cfg.d_model // cfg.n_heads
    past_names, present_names = _cache_names(layers)
    b, t, p = inputs.shape[0], inputs.shape[1], 5
    past = [torch.randn(b, heads, p, head_dim) for _ in past_names]
    mask = torch.ones(b, p + t, dtype=torch.int64)
    mask[0, :2] = 0  # a left-padded row
    dynamic = {
        first: {0: "batch", 1: "steps"},
        "attention_mask": {0: "batch", 1: "total_steps"},
        out: {0: "batch"},
        **{name: {0: "batch", 2: "past_steps"} for name in past_names},
        **{name: {0: "batch", 2: "steps"} for name in present_names},
    }
    if isinstance(model, ARModel):
        step, draws = (
            _ARStep(model),
            {"temperature": torch.tensor(0.7), "uniform": torch.rand(b, 3)},
        )
    else:
        step, draws = _CALMStep(model), {"noise": torch.rand(b, 3, model.config.noise_dim) - 0.5}
    dynamic |= {"tokens": {0: "batch", 1: "samples"}}
    dynamic |= {name: {0: "batch", 1: "samples"} for name in draws if name != "temperature"}
    return _export(
        step,
        (inputs, mask, *draws.values(), *past),
        path,
        [first, "attention_mask", *draws, *past_names],
        [out, "tokens", *present_names],
        dynamic,
    )


def export_calm(model: CALM, out_dir: str | Path) -> dict[str, Path]:
    """Write CALM's backbone, sampler and encoder graphs into out_dir; returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = model.config
    k, d = c.k, c.backbone.d_model
    chunks = torch.randint(4, c.backbone.vocab_size, (2, 3, k))
    paths = {
        "calm_backbone": _export_step(
            model, chunks, "chunks", "hidden", out_dir / GRAPH_FILES["calm_backbone"]
        ),
        "calm_sampler": _export(
            _Sampler(model),
            (torch.randn(2, d), torch.rand(2, 3, c.noise_dim) - 0.5),
            out_dir / GRAPH_FILES["calm_sampler"],
            ["hidden", "noise"],
            ["latents", "tokens"],
            {
                "hidden": {0: "batch"},
                "noise": {0: "batch", 1: "samples"},
                "latents": {0: "batch", 1: "samples"},
                "tokens": {0: "batch", 1: "samples"},
            },
        ),
        "calm_encoder": _export(
            _Encoder(model),
            (chunks[:, 0],),
            out_dir / GRAPH_FILES["calm_encoder"],
            ["chunks"],
            ["mean", "log_std"],
            {"chunks": {0: "batch"}, "mean": {0: "batch"}, "log_std": {0: "batch"}},
        ),
    }
    return paths


def export_ar(model: ARModel, out_dir: str | Path) -> dict[str, Path]:
    """Write the discrete baseline's step graph into out_dir; returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(4, model.config.backbone.vocab_size, (2, 3))
    path = _export_step(model, ids, "input_ids", "logits", out_dir / GRAPH_FILES["ar_backbone"])
    return {"ar_backbone": path}


def quantize_int8(path: Path) -> Path:
    """Dynamically quantised copy (int8 weights of MatMul/Gemm) beside the graph: x.onnx -> x.int8.onnx."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = path.with_suffix(".int8.onnx")
    quantize_dynamic(path, target, weight_type=QuantType.QInt8)
    onnx.checker.check_model(str(target), full_check=True)
    return target


def store_weights_float16(path: Path, min_elements: int = 1024) -> None:
    """Store a graph's float32 weights as float16 (half the file), cast back on load.

    Each weight tensor with >= min_elements elements becomes a float16 initializer feeding a
    Cast to float32 under the weight's old name; onnxruntime folds these casts when the session
    is created, so the arithmetic stays float32 and only the weights carry float16 rounding
    (relative error <= 2^-11). For shipping a bundle inside a size budget.
    """
    model = onnx.load(str(path))
    casts = []
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT or np.prod(tensor.dims) < min_elements:
            continue
        name = tensor.name
        half = numpy_helper.from_array(
            numpy_helper.to_array(tensor).astype(np.float16), f"{name}.fp16"
        )
        tensor.CopyFrom(half)
        casts.append(helper.make_node("Cast", [half.name], [name], to=onnx.TensorProto.FLOAT))
    nodes = casts + list(model.graph.node)  # casts first: the graph stays topologically sorted
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def _flops_line(config: CALMConfig | ARConfig) -> dict[str, float]:
    """FLOPs per generated token = base + per_position * context positions (plain draws)."""
    base = inference_flops_per_token(config, 0)
    return {"base": base, "per_context_position": inference_flops_per_token(config, 1) - base}


def export_bundle(
    calm: CALM,
    tokenizer_path: str | Path,
    root: str | Path,
    name: str,
    version: str,
    *,
    ar: ARModel | None = None,
    metrics: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    int8: bool = False,
    ar_graphs: bool = True,
    weights: Literal["float32", "float16"] = "float32",
) -> Bundle:
    """Export CALM (and its baseline) into the verified bundle `root/<name>-<version>/`.

    `int8` adds dynamically quantised copies of the generation graphs. `ar_graphs=False` records
    the baseline's config, FLOPs and metrics without its graph (the telemetry's counterfactual
    needs only those). `weights="float16"` stores the float32 graphs' weights as float16
    (`store_weights_float16`), halving the bundle.
    """
    tokenizer = Tokenizer.load(tokenizer_path)
    c = calm.config
    if tokenizer.vocab_size != c.backbone.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids, the model {c.backbone.vocab_size}"
        )
    if ar is not None and ar.config.backbone.vocab_size != c.backbone.vocab_size:
        raise ValueError("CALM and the AR baseline must share the tokenizer's vocabulary")
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_calm(calm, tmp) | (export_ar(ar, tmp) if ar and ar_graphs else {})
        quantized = {
            f"{role}.int8": quantize_int8(path)
            for role, path in paths.items()
            if int8 and role != "calm_encoder"  # not on the generation path
        }
        if weights == "float16":
            for path in paths.values():
                store_weights_float16(path)
        paths |= quantized
        models = {"calm": config_to_dict(c)} | ({"ar": config_to_dict(ar.config)} if ar else {})
        flops = {"calm": _flops_line(c)} | ({"ar": _flops_line(ar.config)} if ar else {})
        fields = {
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "k": c.k,
            "vocab_size": c.backbone.vocab_size,
            "special_ids": {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID, "mask": MASK_ID},
            "dims": {
                "d_model": c.backbone.d_model,
                "n_layers": c.backbone.n_layers,
                "n_heads": c.backbone.n_heads,
                "max_positions": c.backbone.max_seq_len,
                "latent_dim": c.autoencoder.latent_dim,
                "noise_dim": c.noise_dim,
                "ae_d_model": c.autoencoder.d_model,
            },
            "models": models,
            "weights": weights,
            "flops_per_token": flops,
            "metrics": metrics or {},
            "recipe": recipe or {},
            "exporter": {"torch": torch.__version__, "onnx_opset": OPSET, "onnx": onnx.__version__},
        }
        files = {p.name: p for p in paths.values()} | {"tokenizer.json": Path(tokenizer_path)}
        graphs = {role: path.name for role, path in paths.items()}
        return write_bundle(root, name, version, files, graphs, fields)
