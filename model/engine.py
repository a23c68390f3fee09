"""Generation with onnxruntime and numpy only: the serving path of the streaming workers.

An `Engine` runs one model of a bundle (model/bundle.py): CALM or its discrete baseline (AR).
It mirrors the torch loop of model/generate.py step for step, so that with the same noise both
produce the same tokens:

- Ragged batches: each prompt is left-padded with <pad> to a multiple of K (the padding CALM was
  trained on), then with whole pad chunks, which the attention mask hides, up to its bucket
  (the next multiple of PROMPT_BUCKET_TOKENS). Rows of one bucket run together; a batch with
  rows in several buckets runs them one bucket after the other.
- Batch invariance: a row's tensors have the same layout alone or in any batch (its pads depend
  on its own length, its cache grows on the same schedule), so its output never depends on its
  batch-mates or the batch size. Padding to the batch's longest prompt instead changed the row's
  hidden states by ~1e-6 (onnxruntime's vectorised reductions over the key axis add the same
  terms in another order when the real keys sit at another offset); measured in onnxruntime
  1.32 on AVX2, rows of identical layout give bit-identical outputs at any batch size (the
  per-row GEMM reductions do not depend on M), which tests/model/test_batch_invariance.py checks.
- Prefill runs the backbone graph over every prompt chunk at once; each decode step feeds the
  chunk just produced (K tokens; one for AR) with the KV cache. Rows that finish leave the batch.
- Stopping: a row ends at its first <eos> (not emitted) or at its token limit; the last chunk is
  truncated, so a row never overshoots, and no step runs for a finished row.
- Per-request seeds: each row owns a numpy generator that supplies its head noise (the sampler
  graph takes noise as an input) and every uniform its temperature sampler uses, so a row's output
  depends on its prompt and seed only.
- Temperature: CALM uses the likelihood-free samplers of model/sampling.py through their
  `draw(rows)` interface (T = 1 is one plain draw; `adaptive` is the default for T < 1: exact
  rejection in growing rounds, a fraction of the approximate rule's 200 candidates when the model
  is confident). AR samples softmax(logits / T), or argmax at T = 0.

Fused sampling: at T = 1 (CALM) or T > 0 (AR) the step graph also samples the next chunk from
the draws fed beside it (model/export.py), taken from each row's generator exactly as
model/generate.py takes them, so a generative step is one call: a batch-1 step is bound by the
call and node overhead and by streaming the weights, not by arithmetic.

Sessions are tuned for CPU throughput: full graph optimisation, sequential execution, explicitly
sized intra-op pools that do not spin. The KV cache is a preallocated numpy buffer that the graph
reads in place (model/export.py); each step writes only the new keys/values into it.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnxruntime as ort

from model import sampling as chunk_samplers
from model.bundle import Bundle, BundleError
from model.chunking import accept_chunk, pad_prompts
from model.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

ModelKind = Literal["calm", "ar"]
SAMPLER_LOGITS_BYTES = 64 << 20
SamplerName = Literal["exact", "approximate", "adaptive"]
# A prompt is left-padded to the next multiple of this many tokens (of whole positions), and only
# prompts of one bucket share engine calls: see "Batch invariance" in the module docstring.
PROMPT_BUCKET_TOKENS = 32


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]  # token ids as the model reads them, normally <bos> + text
    seed: int = 0
    max_new_tokens: int = 96
    submitted: float | None = None  # time.perf_counter() when it was queued


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # CALM: (0, 1]; AR: [0, 1], 0 = greedy
    sampler: SamplerName = "adaptive"
    pool_size: int = 200  # the approximate rule's N and the adaptive sampler's cap


@dataclass
class RequestStats:
    tokens_in: int  # prompt tokens, pads excluded
    tokens_out: int = 0
    steps: int = 0  # generative steps (sampled chunks)
    head_samples: int = 0  # energy-head draws (AR: one per step)
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0


@dataclass
class Result:
    tokens: list[int]  # generated ids, without the prompt and without <eos>
    finish_reason: str  # "eos" or "length"
    stats: RequestStats
    text: str = ""


@dataclass
class _Progress:
    """Every request's generator, limit and output so far, filled in bucket by bucket."""

    rngs: list[np.random.Generator]
    limits: np.ndarray
    stop_on_eos: bool
    out: list[list[int]]
    reasons: list[str]
    stats: list[RequestStats]
    start: float  # when generate() was called


class _Cache:
    """Preallocated keys/values of every layer in one buffer [2 * layers, B, H, capacity, hd],
    and their slot mask [B, capacity].

    The backbone graph reads each layer's keys or values in place (a contiguous view of the
    buffer; unfilled slots are masked) and returns only the new positions' keys/values, which
    `append` writes at the next free slots, all layers in one assignment. Capacity grows in
    blocks of GROWTH slots, so the buffer is copied once per GROWTH steps instead of at every
    step, and attention scans at most GROWTH - 1 empty slots.
    """

    GROWTH = 16

    def __init__(self, batch: int, tensors: int, heads: int, head_dim: int):
        self.buffer = np.zeros((tensors, batch, heads, 0, head_dim), np.float32)
        self.mask = np.zeros((batch, 0), dtype=np.int64)
        self.length = 0

    @property
    def tensors(self) -> list[np.ndarray]:
        return list(self.buffer)

    def append(self, new: list[np.ndarray], new_mask: np.ndarray) -> None:
        end = self.length + new_mask.shape[1]
        if end > self.mask.shape[1]:
            grow = end + self.GROWTH - self.mask.shape[1]
            self.buffer = np.pad(self.buffer, ((0, 0), (0, 0), (0, 0), (0, grow), (0, 0)))
            self.mask = np.pad(self.mask, ((0, 0), (0, grow)))
        self.buffer[:, :, :, self.length : end] = new
        self.mask[:, self.length : end] = new_mask
        self.length = end

    def keep(self, rows: np.ndarray) -> None:
        self.buffer = self.buffer[:, rows]
        self.mask = self.mask[rows]


def session_options(threads: int) -> ort.SessionOptions:
    """Options for CPU throughput, with an explicitly sized intra-op pool per session.

    The engine runs its sessions one after the other, so each gets `threads` and no spinning: an
    idle pool sleeps instead of competing with the session that runs (and with the other actors
    on the node). onnxruntime's process-wide shared pool is not used: once it exists, every other
    session in the process must opt in to it or fails to load.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


class Engine:
    """One model of a verified bundle, ready to generate (see the module docstring)."""

    def __init__(
        self,
        bundle: Bundle,
        model: ModelKind = "calm",
        threads: int = 1,
        int8: bool = False,
    ):
        if model not in ("calm", "ar"):
            raise ValueError(f"model must be 'calm' or 'ar', got {model!r}")
        models = bundle.manifest.get("models", {})
        if model not in models:
            raise BundleError(f"bundle {bundle.id} has no {model!r} model")
        self.bundle, self.kind = bundle, model
        self.config = models[model]
        backbone = self.config["backbone"]
        self.k = bundle.manifest["k"] if model == "calm" else 1
        self.max_seq_len, self.n_heads = backbone["max_seq_len"], backbone["n_heads"]
        self.head_dim = backbone["d_model"] // backbone["n_heads"]
        self.tokenizer = Tokenizer.load(bundle.tokenizer_path)
        suffix = ".int8" if int8 else ""
        options = session_options(threads)

        def session(role: str) -> ort.InferenceSession:
            path = bundle.graph(role + suffix)
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        self.backbone = session(f"{model}_backbone")
        self.sampler = session("calm_sampler") if model == "calm" else None
        # the sampler materialises [rows, K, vocab] logits: feed it at most ~64 MB of them at once
        self.sampler_rows = max(1, SAMPLER_LOGITS_BYTES // (4 * self.k * backbone["vocab_size"]))
        names = [i.name for i in self.backbone.get_inputs()]
        self.input_name = names[0]  # chunks (CALM) or input_ids (AR)
        self.past_names = [n for n in names if n.startswith("past_key_values.")]

    # -- backbone ----------------------------------------------------------------------------

    def _run_backbone(
        self, inputs: np.ndarray, new_mask: np.ndarray, cache: _Cache, draws: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """One backbone call over T new positions: the last position's output and the chunks
        the step graph sampled with `draws` (`_draws`; none for an empty samples axis)."""
        feeds = {
            self.input_name: inputs,
            "attention_mask": np.concatenate([cache.mask, new_mask], 1),
        }
        feeds |= draws
        feeds |= zip(self.past_names, cache.tensors)
        out = self.backbone.run(None, feeds)
        cache.append(out[-len(self.past_names) :], new_mask)
        return out[0], out[1]

    def _draws(self, rngs: list[np.random.Generator], s: Sampling) -> dict[str, np.ndarray]:
        """The fused step graph's random inputs: each row's draw for the chunk after this step,
        from its generator exactly as the numpy samplers draw it (CALM: the head noise at T = 1;
        AR: the sampling uniform at T > 0), or none (an empty samples axis)."""
        b = len(rngs)
        if self.kind == "ar":
            one = s.temperature > 0.0
            u = [g.random(dtype=np.float32) for g in rngs] if one else []
            uniform = np.array(u, dtype=np.float32).reshape(b, int(one))
            return {"temperature": np.array(s.temperature or 1.0, np.float32), "uniform": uniform}
        noise_dim = self.config["noise_dim"]
        if s.temperature != 1.0:
            return {"noise": np.empty((b, 0, noise_dim), dtype=np.float32)}
        noise = np.empty((b, 1, noise_dim), dtype=np.float32)
        for g, row in zip(rngs, noise):
            g.random(dtype=np.float32, out=row)
        noise -= 0.5  # uniform in [-0.5, 0.5), as CALM.noise
        return {"noise": noise}

    # -- choosing the next chunk -------------------------------------------------------------

    def _calm_next(
        self, hidden: np.ndarray, rngs: list[np.random.Generator], s: Sampling
    ) -> tuple[np.ndarray, np.ndarray]:
        """CALM's next chunks at T < 1: the temperature samplers drawing through the sampler
        graph (at T = 1 the fused step graph samples them)."""
        noise_dim = self.config["noise_dim"]

        def draw(rows: np.ndarray) -> np.ndarray:
            noise = np.empty((rows.size, 1, noise_dim), dtype=np.float32)
            order = np.argsort(rows, kind="stable")
            groups = np.unique(rows[order], return_index=True, return_counts=True)
            for r, start, count in zip(*groups):  # a row's noise from its own generator, in order
                at = order[start : start + count]
                noise[at, 0] = rngs[r].random((count, noise_dim), dtype=np.float32)
            noise -= 0.5  # uniform in [-0.5, 0.5), as CALM.noise
            return np.concatenate(
                [
                    self.sampler.run(
                        ["tokens"], {"hidden": hidden[rows[i:j]], "noise": noise[i:j]}
                    )[0]
                    for i, j in _blocks(rows.size, self.sampler_rows)
                ]
            )[:, 0]

        b = len(rngs)
        if s.sampler == "approximate":
            pool = draw(np.repeat(np.arange(b), s.pool_size)).reshape(b, s.pool_size, -1)
            chunks = chunk_samplers.approximate_temperature_sample(pool, s.temperature, rngs)
            return chunks, np.full(b, s.pool_size, dtype=np.int64)
        if s.sampler == "exact":
            out = chunk_samplers.exact_temperature_sample(draw, b, s.temperature, rngs)
        else:
            out = chunk_samplers.adaptive_temperature_sample(
                draw, b, s.temperature, rngs, max_draws=s.pool_size
            )
        return out.chunks, out.draws

    # -- the loop ----------------------------------------------------------------------------

    def _check(self, requests: Sequence[Request], s: Sampling) -> None:
        if not requests:
            raise ValueError("no requests")
        t = s.temperature
        if not (0.0 <= t <= 1.0 if self.kind == "ar" else 0.0 < t <= 1.0):
            allowed = "[0, 1] (0 = greedy)" if self.kind == "ar" else "(0, 1]"
            raise ValueError(f"temperature {t} outside {allowed} for {self.kind}")
        if s.sampler not in ("exact", "approximate", "adaptive") or s.pool_size < 1:
            raise ValueError(f"unknown sampler {s.sampler!r} or pool_size {s.pool_size} < 1")
        vocab = self.config["backbone"]["vocab_size"]
        for i, r in enumerate(requests):
            if r.max_new_tokens < 0:
                raise ValueError(f"request {i}: max_new_tokens must be >= 0")
            ids = np.asarray(r.prompt)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise ValueError(f"request {i}: prompt ids outside the vocabulary 0..{vocab - 1}")
            chunks = -(-len(r.prompt) // self.k)
            if chunks + -(-r.max_new_tokens // self.k) - 1 > self.max_seq_len:
                raise ValueError(
                    f"request {i}: prompt of {chunks} positions + {r.max_new_tokens} new tokens "
                    f"exceeds the model's {self.max_seq_len} positions"
                )

    def prefill(
        self,
        prompts: list[Sequence[int]],
        positions: int,
        rngs: list[np.random.Generator],
        sampling: Sampling,
    ) -> tuple[np.ndarray, np.ndarray, _Cache]:
        """One backbone call over prompts left-padded to `positions` (`padded_positions` of each
        one's length): each row's last state (AR: logits), the chunks the fused step graph drew
        from `rngs` (`_draws`) and the KV cache that decode steps extend."""
        chunks, mask = pad_prompts(prompts, self.k, PAD_ID, positions)
        inputs = chunks if self.kind == "calm" else chunks[..., 0]
        cache = _Cache(len(prompts), len(self.past_names), self.n_heads, self.head_dim)
        hidden, drawn = self._run_backbone(
            inputs, mask.astype(np.int64), cache, self._draws(rngs, sampling)
        )
        return hidden, drawn, cache

    def _run_rows(
        self,
        prompts: list[Sequence[int]],
        rows: np.ndarray,
        positions: int,
        p: _Progress,
        sampling: Sampling,
    ) -> None:
        """Generate `rows` (indices into `p`) whose prompts all pad to `positions`: one prefill,
        then one step per chunk until every row ended (see the module docstring)."""
        alive, rngs = rows, [p.rngs[i] for i in rows]
        hidden, drawn, cache = self.prefill(prompts, positions, rngs, sampling)
        prefilled = time.perf_counter()
        for i in alive:
            p.stats[i].prefill_s = prefilled - p.start
        while True:
            if drawn.shape[1]:  # sampled by the fused step graph (CALM at T = 1, AR at T > 0)
                new, cost = drawn[:, 0].reshape(alive.size, self.k), np.ones(alive.size, np.int64)
            elif self.kind == "calm":
                new, cost = self._calm_next(hidden, rngs, sampling)
            else:  # AR at T = 0: `hidden` is the logits
                new, cost = hidden.argmax(-1)[:, None], np.ones(alive.size, np.int64)
            keep = np.ones(alive.size, dtype=bool)
            now = time.perf_counter()
            for j, i in enumerate(alive):
                tokens, ended = accept_chunk(
                    new[j].tolist(), p.limits[i] - len(p.out[i]), EOS_ID, p.stop_on_eos
                )
                if ended:
                    p.reasons[i], keep[j] = "eos", False
                p.out[i] += tokens
                p.stats[i].steps += 1
                p.stats[i].head_samples += int(cost[j])
                keep[j] &= len(p.out[i]) < p.limits[i]
                if not keep[j]:
                    p.stats[i].decode_s = now - prefilled
            if not keep.any():
                return
            if not keep.all():
                cache.keep(np.flatnonzero(keep))
            alive, new = alive[keep], new[keep]
            rngs = [p.rngs[i] for i in alive]
            step_input = new[:, None] if self.kind == "calm" else new
            hidden, drawn = self._run_backbone(
                step_input,
                np.ones((alive.size, 1), np.int64),
                cache,
                self._draws(rngs, sampling),
            )

    def generate(
        self,
        requests: Sequence[Request],
        sampling: Sampling = Sampling(),
        stop_on_eos: bool = True,
    ) -> list[Result]:
        """Continue every request's prompt (see the module docstring); one Result per request.

        Request i draws from np.random.default_rng(seed_i), as model/generate.py does.
        `stop_on_eos=False` generates every row to its limit (<eos> kept), as benchmarks do.
        """
        start = time.perf_counter()
        self._check(requests, sampling)
        b = len(requests)
        rngs = [np.random.default_rng(r.seed) for r in requests]
        limits = np.array([r.max_new_tokens for r in requests], dtype=np.int64)
        stats = [
            RequestStats(
                tokens_in=len(r.prompt),
                queue_s=0.0 if r.submitted is None else max(0.0, start - r.submitted),
            )
            for r in requests
        ]
        progress = _Progress(
            rngs, limits, stop_on_eos, [[] for _ in range(b)], ["length"] * b, stats, start
        )
        alive = np.flatnonzero(limits > 0)
        buckets = [self.padded_positions(len(requests[i].prompt)) for i in alive]
        for bucket in sorted(set(buckets)):
            rows = alive[np.array(buckets) == bucket]
            self._run_rows([requests[i].prompt for i in rows], rows, bucket, progress, sampling)
        out, reasons = progress.out, progress.reasons
        results = []
        for i in range(b):
            stats[i].tokens_out = len(out[i])
            text = self.tokenizer.decode(out[i])
            results.append(Result(out[i], reasons[i], stats[i], text))
        return results

    def padded_positions(self, prompt_tokens: int) -> int:
        """The positions a prompt of `prompt_tokens` ids fills once padded to its bucket: a
        function of its own length only."""
        bucket = max(1, PROMPT_BUCKET_TOKENS // self.k)
        return -(-prompt_tokens // (self.k * bucket)) * bucket

    def prompt_ids(self, text: str) -> list[int]:
        """What the model reads for a text prompt: <bos> + its tokens."""
        return [BOS_ID, *self.tokenizer.encode(text)]
