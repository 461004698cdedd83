"""How fast is EfficientAD on *this* machine? (Batzner et al., WACV 2024.)

The paper reports latency and throughput on GPUs (EfficientAD-S: about 2 ms per image and
600 images/s on an NVIDIA RTX A6000). Those are the paper's numbers on the paper's hardware,
never ours. Here we measure, on the CPU at hand:

* the whole inference of one image batch: teacher + student + autoencoder + both maps, their
  normalisation, the combined map and its resizing (:meth:`EfficientAD.predict`);
* ms per image and images per second at batch 1 and batched, after warm-up runs, as medians;
* the floating-point operations per image, counted by ``torch.utils.flop_counter``
  (a multiply-add = 2 FLOPs), and the achieved GFLOP/s;
* this CPU's matmul peak, measured in the same run with a large ``torch.mm``: the best a
  dense kernel reaches here, so ``FLOPs / peak`` is the time a perfect implementation
  would need.
"""
from __future__ import annotations

import statistics
import time

import torch

#: The paper's GPU numbers, printed for reference only (measured there on an NVIDIA RTX A6000):
#: EfficientAD-S about 2 ms per image and 600 images/s; EfficientAD-M 4.5 ms per image.
PAPER_REFERENCE = {"EfficientAD-S": "about 2 ms / image, about 600 images/s (RTX A6000 GPU)",
                   "EfficientAD-M": "about 4.5 ms / image (RTX A6000 GPU)"}


def median_seconds(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def count_flops(fn) -> int:
    """Floating-point operations of ``fn()`` counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """This CPU's dense float32 matmul rate in GFLOP/s: ``2 n^3`` FLOPs of an ``n x n`` mm."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / median_seconds(lambda: torch.mm(a, b), repeats, warmup=1) / 1e9


def measure(detector, image_size: int = 256, batch_sizes=(1, 8), repeats: int = 5,
            peak_gflops: float | None = None) -> list[dict]:
    """One record per batch size: ms per image, images/s, GFLOP per image, achieved GFLOP/s,
    the peak, and ``bound_ratio`` = measured time / (FLOPs / peak) (1 = at the peak)."""
    peak = matmul_peak() if peak_gflops is None else peak_gflops
    records = []
    for b in batch_sizes:
        images = torch.rand(b, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            flops = count_flops(lambda: detector.predict(images))
            seconds = median_seconds(lambda: detector.predict(images), repeats)
        records.append({"batch": b, "ms_per_image": 1e3 * seconds / b, "img_per_s": b / seconds,
                        "gflop_per_image": flops / b / 1e9,
                        "achieved_gflops": flops / seconds / 1e9, "peak_gflops": peak,
                        "bound_ratio": seconds / (flops / peak / 1e9)})
    return records


def paper_size_detector(model_size: str = "small", seed: int = 0):
    """An EfficientAD at the paper's sizes (256 px, C = 384, student 768, the paper autoencoder)
    with random weights and unit normalisation: for timing and FLOP counts only (speed does not
    depend on the weights)."""
    from adlab.distill.autoencoder import PAPER_DECODER_SIZES, autoencoder
    from adlab.distill.efficientad import EfficientAD
    from adlab.distill.pdn import pdn

    det = EfficientAD(model_size=model_size, image_size=256, width=128, out_channels=384,
                      ae_decoder_sizes=PAPER_DECODER_SIZES, single_thread=False)
    torch.manual_seed(seed)
    det.teacher = pdn(model_size, 384, 128).eval()
    det.student = pdn(model_size, 768, 128).eval()
    det.autoencoder = autoencoder(384, 256, 56, PAPER_DECODER_SIZES).eval()
    det.t_mean, det.t_std = torch.zeros(1, 384, 1, 1), torch.ones(1, 384, 1, 1)
    det.quantiles = {"st": (torch.tensor(0.0), torch.tensor(1.0)),
                     "ae": (torch.tensor(0.0), torch.tensor(1.0))}
    return det


def report(batch_sizes=(1, 4), repeats: int = 3, sizes=("small", "medium")) -> str:
    """The latency table of EfficientAD-S and -M at 256 px on this machine, as markdown."""
    peak = matmul_peak()
    lines = [f"CPU matmul peak (torch.mm 2048, float32, {torch.get_num_threads()} threads): "
             f"{peak:.1f} GFLOP/s", "",
             "| model | batch | ms / image | images / s | GFLOP / image | GFLOP/s | "
             "time / (FLOPs / peak) |", "|---|---|---|---|---|---|---|"]
    for size in sizes:
        for r in measure(paper_size_detector(size), 256, batch_sizes, repeats, peak):
            lines.append(f"| EfficientAD-{size[0].upper()} | {r['batch']} | {r['ms_per_image']:.1f} | "
                         f"{r['img_per_s']:.2f} | {r['gflop_per_image']:.2f} | "
                         f"{r['achieved_gflops']:.1f} | {r['bound_ratio']:.2f} |")
    lines += ["", "Paper, for reference only (not measured here): "
              + "; ".join(f"{k}: {v}" for k, v in PAPER_REFERENCE.items())]
    return "\n".join(lines)


if __name__ == "__main__":   # python -m adlab.distill.latency
    print(report())


__all__ = ["measure", "paper_size_detector", "report", "matmul_peak", "count_flops", "median_seconds", "PAPER_REFERENCE"]
