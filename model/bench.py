"""Measurements of the model library; each function returns a JSON-ready dict.

    python -m model.bench autoencoder   # reconstruction / noise robustness on held-out WikiText
    python -m model.bench energy-memory # peak memory: energy loss vs the naive materialised form
    python -m model.bench alignment     # loss per left-pad offset: random-pad training vs none
    python -m model.bench flops         # analytic FLOPs per token, CALM vs AR (default configs)

Peak memory is the growth of the kernel's resident-memory high-water mark in a fresh Python
process that runs one forward + backward of the loss (Linux /proc), next to the analytic size of
the largest tensor each form builds.
"""

import dataclasses
import json
import subprocess
import sys
import time

import numpy as np
import torch

from model import flops
from model.autoencoder import Autoencoder, reconstruction_accuracy
from model.calm import CALM, energy_loss
from model.config import ARConfig, AutoencoderConfig, BackboneConfig, CALMConfig
from model.data import chunk_batches, pack_rows, row_batches, sample_chunks, wikitext_streams
from model.tokenizer import PAD_ID
from model.train_loops import evaluate_loss, fit


def naive_energy_loss(
    samples: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, m_targets: int, generator=None
) -> torch.Tensor:
    """The official form: materialises the [P, N, M, D] and [P, N, N, D] difference tensors."""
    p, n, d = samples.shape
    noise = torch.randn(
        (p, m_targets, d), generator=generator, device=samples.device, dtype=mean.dtype
    )
    targets = mean[:, None] + log_std.exp()[:, None] * noise
    to_targets = (samples[:, :, None] - targets[:, None]).norm(dim=-1).mean(dim=(1, 2))
    between = (samples[:, :, None] - samples[:, None]).norm(dim=-1).sum(dim=(1, 2)) / (n * (n - 1))
    return 2 * to_targets - between


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def energy_loss_peak_mib(form: str, positions: int, n: int, m: int, latent: int) -> float:
    """Peak resident-memory growth (MiB) over one forward + backward of the loss in THIS process:
    the kernel's high-water mark (VmHWM), reset first (/proc/self/clear_refs), minus VmRSS before."""
    torch.manual_seed(0)
    samples = torch.randn(positions, n, latent, requires_grad=True)
    mean, log_std = torch.randn(positions, latent), torch.full((positions, latent), -1.0)
    loss_fn = {"ours": energy_loss, "naive": naive_energy_loss}[form]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = _status_kib("VmRSS")
    loss_fn(samples, mean, log_std, m).mean().backward()
    return (_status_kib("VmHWM") - before) / 1024


def energy_memory(positions: int = 2048, n: int = 8, m: int = 100, latent: int = 128) -> dict:
    """Both forms side by side, each in a fresh process; defaults: paper N, M, latent."""
    peaks = {}
    for form in ("ours", "naive"):
        code = (
            "import torch; torch.set_num_threads(1); from model.bench import energy_loss_peak_mib;"
            f"print(energy_loss_peak_mib({form!r}, {positions}, {n}, {m}, {latent}))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        peaks[form] = float(out.stdout.strip().splitlines()[-1])
    mib = 4 / 2**20
    return {
        "positions": positions,
        "n_samples": n,
        "m_targets": m,
        "latent": latent,
        "peak_rss_growth_mib": peaks,
        "ratio_naive_over_ours": peaks["naive"] / peaks["ours"],
        "tensor_mib": {  # analytic float32 sizes
            "targets_PMD_both_forms": positions * m * latent * mib,
            "distances_PNM_ours": positions * n * m * mib,
            "differences_PNMD_naive_only": positions * n * m * latent * mib,
        },
    }


def autoencoder_quality(
    config: AutoencoderConfig | None = None,
    steps: int = 1500,
    batch_size: int = 256,
    lr: float = 3e-3,
    sigmas: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5),
    eval_chunks: int = 50000,
    seed: int = 0,
) -> dict:
    """Train the autoencoder on WikiText documents, report held-out token reconstruction."""
    config = config or AutoencoderConfig()
    start = time.perf_counter()
    _, train, heldout = wikitext_streams(config.vocab_size)
    torch.manual_seed(seed)
    model = Autoencoder(config)
    losses = fit(model, chunk_batches(train, batch_size, config.k, seed), steps, lr=lr, warmup=20)
    chunks = torch.as_tensor(
        sample_chunks(heldout, eval_chunks, config.k, np.random.default_rng(1))
    )
    return {
        "config": dataclasses.asdict(config),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "final_train_loss": float(np.mean(losses[-20:])),
        "heldout_tokens": int(chunks.numel()),
        "heldout_accuracy": {str(s): reconstruction_accuracy(model, chunks, s) for s in sigmas},
        "seconds": time.perf_counter() - start,
    }


def mean_and_stderr(model, batches: list[np.ndarray]) -> dict:
    """Validation loss over fixed batches, with the standard error of the batch means."""
    losses = [evaluate_loss(model, [batch]) for batch in batches]
    return {
        "loss": float(np.mean(losses)),
        "stderr": float(np.std(losses, ddof=1) / np.sqrt(len(losses))),
    }


@torch.no_grad()
def next_chunk_loss(
    model: CALM, rows: np.ndarray, pads: int, prompt_chunks: int, right_pad: bool, seed: int = 0
) -> dict:
    """Energy loss (mean, stderr over rows) of the chunk after each row's prompt.

    rows come from pack_rows(..., left_pads=pads): the prompt is rows[:, pads : P*K] (<bos> and
    P*K - pads - 1 tokens), the truth rows[:, P*K : P*K + K]. The prompt's `pads` pads go before
    it (ours) or after it (right_pad, the official code). Fixed noise and targets for both.
    """
    k, end = model.config.k, prompt_chunks * model.config.k
    ids = torch.as_tensor(rows)
    prompt, padding = ids[:, pads:end], torch.full((len(ids), pads), PAD_ID)
    inputs = torch.cat((prompt, padding) if right_pad else (padding, prompt), dim=1)
    model.eval()
    hidden, _ = model.backbone(model.embed_chunks(inputs.view(len(ids), prompt_chunks, k)))
    generator = torch.Generator().manual_seed(seed)
    samples = model.head(hidden[:, -1], model.noise((len(ids), model.config.n_samples), generator))
    mean, log_std = model.autoencoder.encode(ids[:, end : end + k])
    loss = energy_loss(samples, mean, log_std, model.config.m_targets, generator)
    return {"loss": loss.mean().item(), "stderr": (loss.std() / len(loss) ** 0.5).item()}


def alignment(
    steps: int = 1500,
    ae_steps: int = 600,
    vocab_size: int = 1024,
    d_model: int = 64,
    n_layers: int = 2,
    row_chunks: int = 16,
    batch_size: int = 16,
    lr: float = 3e-3,
    eval_rows: int = 1024,
    seed: int = 0,
) -> dict:
    """Prompt alignment, measured: a CALM trained with random left pads (0..K-1 before <bos>)
    against one trained without, from the same autoencoder, init and training windows.

    - all_chunks: validation energy loss of rows that start with r = 0..K-1 pads;
    - next_chunk: energy loss of the true chunk that follows a held-out prompt of
      prompt_chunks * K - r tokens, the prompt aligned our way (left pads, what
      left_pad_to_multiple gives) or the official code's way (right pads after the prompt).
    """
    ae_config = AutoencoderConfig(vocab_size=vocab_size)
    backbone = BackboneConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=2,
        d_ff=d_model * 11 // 4,
        max_seq_len=row_chunks,
    )
    config = CALMConfig(backbone=backbone, autoencoder=ae_config, head_layers=2)
    k, row_len = config.k, row_chunks * config.k
    start = time.perf_counter()
    _, train, heldout = wikitext_streams(vocab_size)
    torch.manual_seed(seed)
    autoencoder = Autoencoder(ae_config)
    fit(autoencoder, chunk_batches(train, 256, k, seed), ae_steps, lr=3e-3, warmup=20)
    chunks = torch.as_tensor(sample_chunks(heldout, 20000, k, np.random.default_rng(1)))
    rows = {
        r: pack_rows(heldout, eval_rows, row_len, k, np.random.default_rng(1), r) for r in range(k)
    }
    report = {
        "k": k,
        "steps": steps,
        "lr": lr,
        "row_chunks": row_chunks,
        "batch_size": batch_size,
        "backbone": dataclasses.asdict(backbone),
        "autoencoder_heldout_accuracy": reconstruction_accuracy(autoencoder, chunks),
    }
    for name, random_pads in (("random_pads", True), ("no_pads", False)):
        torch.manual_seed(seed + 1)
        model = CALM(config, autoencoder)
        batches = row_batches(train, batch_size, row_len, k, seed, random_pads)
        before = evaluate_loss(model, np.array_split(rows[0], 8))
        fit(model, batches, steps, lr=lr, warmup=20)
        report[name] = {
            "untrained_loss": before,
            "all_chunks": {r: mean_and_stderr(model, np.array_split(rows[r], 8)) for r in range(k)},
            "next_chunk": {
                scheme: {r: next_chunk_loss(model, rows[r], r, 8, right) for r in range(k)}
                for scheme, right in (("left_pad_ours", False), ("right_pad_official", True))
            },
        }
    report["seconds"] = time.perf_counter() - start
    return report


def flops_report(context_tokens: int = 256) -> dict:
    """Analytic FLOPs per token of the default models, CALM against its AR baseline."""
    calm, ar = CALMConfig(), ARConfig()
    return {
        "context_tokens": context_tokens,
        "training_per_token": {
            "autoencoder": flops.training_flops_per_token(calm.autoencoder),
            "calm": flops.training_flops_per_token(calm, context_tokens // calm.k),
            "ar": flops.training_flops_per_token(ar, context_tokens),
        },
        "inference_per_token": {
            "calm_T1": flops.inference_flops_per_token(calm, context_tokens // calm.k),
            "ar": flops.inference_flops_per_token(ar, context_tokens),
        },
    }


def main(argv: list[str]) -> None:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    commands = {
        "autoencoder": autoencoder_quality,
        "energy-memory": energy_memory,
        "alignment": alignment,
        "flops": flops_report,
    }
    if len(argv) != 1 or argv[0] not in commands:
        raise SystemExit(f"usage: python -m model.bench {{{','.join(commands)}}}")
    print(json.dumps(commands[argv[0]](), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
