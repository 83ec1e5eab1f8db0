"""The reasoning cells for one ranking request: direct form vs exact fast path vs folded inference.

C=100 candidates, M=50 history items, L=30 title tokens, p=4, at D=384 and D=768. Prints one
JSON object (last line): median latency per request, FLOPs of each path from the shapes,
achieved GFLOP/s, this machine's measured fp32 matmul rate, and the max |logit difference|.
Usage: python benchmarks/reasoning.py [--repeats N] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rmbert.models.rmbert import RMBERT, RMBERTConfig
from rmbert.types import NewsRepr

C, M, L, P = 100, 50, 30, 4


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def matmul_gflops(repeats: int) -> float:
    """Measured fp32 GEMM rate on this machine (the same BLAS the model uses)."""
    n = 1024 if DEVICE.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    ms = median_ms(lambda: a @ b, repeats)
    return 2 * n**3 / (ms / 1e3) / 1e9


def flops(D: int) -> dict[str, float]:
    """Multiply-adds x 2 of each path for one request (the dominant terms, from the shapes)."""
    user = M * D * D  # G = W_H H
    query = C * P * (D * D + 2 * D * D + 2 * L * D + D * D)  # W_p, W_k, attention + pooling, W_q
    tail = C * P * (D * D + 2 * D * D + M * D + 2 * D * D) + C * (2 * D * D + D)  # W_r, W_m, U, click
    direct = C * P * (M * D + M * 2 * D * D + M * D)  # I, W_I over [I;H], logits
    fast = C * P * (2 * D * D + 2 * M * D + D)  # v W_I1, v W_I2, one [C, 2D] x [2D, M] product
    # folded (FoldedRMBERT): per user one stacked map of H (G, p-1 P_k, p Q_k); per candidate the
    # history logits from its l_t and u_t (two [D] x [D, M] products a step), r_t from the earlier
    # steps' weights and the click layer from all of them (the query unit, a_t and s_t, and l_t,
    # u_t are per-news terms, computed offline)
    folded_user = M * D * D * 2 * P
    folded_cand = C * (M * D * (2 * P + P * (P - 1) // 2 + P) + P * D)
    return {
        "direct": 2.0 * (user + query + tail + direct),
        "fast": 2.0 * (user + query + tail + fast),
        "folded": 2.0 * (folded_user + folded_cand),
    }


def bench(D: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = RMBERTConfig(dim=D, steps=P)
    fast = RMBERT(cfg).eval().to(DEVICE)
    direct = RMBERT(RMBERTConfig(dim=D, steps=P, fast_path=False)).eval().to(DEVICE)
    direct.load_state_dict(fast.state_dict())
    H = torch.randn(1, M, D, device=DEVICE)
    hm = torch.ones(1, M, dtype=torch.bool, device=DEVICE)
    cand = NewsRepr(
        torch.randn(1, C, D, device=DEVICE),
        torch.randn(1, C, L, D, device=DEVICE),
        torch.ones(1, C, L, dtype=torch.bool, device=DEVICE),
    )
    hist = NewsRepr(H, None, None)
    folded = fast.fold()
    news_terms = folded.news_terms(cand)  # computed once per news, stored beside its vectors
    with torch.inference_mode():
        y_fast = fast(hist, hm, cand)
        y_direct = direct(hist, hm, cand)
        y_fold = folded.score(H, hm, cand, news_terms).logits
        t_direct = median_ms(lambda: direct(hist, hm, cand), max(3, repeats // 4))
        t_fast = median_ms(lambda: fast(hist, hm, cand), repeats)
        t_fold = median_ms(lambda: folded.score(H, hm, cand, news_terms), repeats)
    f = flops(D)
    return {
        "latency_ms": {"direct": round(t_direct, 3), "fast": round(t_fast, 3), "folded": round(t_fold, 3)},
        "gflop": {k: round(v / 1e9, 4) for k, v in f.items()},
        "gflops_per_s": {
            "direct": round(f["direct"] / t_direct / 1e6, 1),
            "fast": round(f["fast"] / t_fast / 1e6, 1),
            "folded": round(f["folded"] / t_fold / 1e6, 1),
        },
        "speedup_fast": round(t_direct / t_fast, 2),
        "speedup_folded": round(t_direct / t_fold, 2),
        "max_abs_diff_fast": float((y_fast - y_direct).abs().max()),
        "max_abs_diff_folded": float((y_fold - y_direct).abs().max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    peak = matmul_gflops(a.repeats)
    out = {
        "shape": {"C": C, "M": M, "L": L, "p": P},
        "device": str(DEVICE),
        "threads": torch.get_num_threads(),
        "matmul_gflops_per_s": round(peak, 1),
    }
    for D in (384, 768):
        out[f"d{D}"] = bench(D, a.repeats)
    d = out["d384"]
    out["speedup_d384"] = d["speedup_fast"]
    out["max_abs_diff"] = max(out[f"d{D}"]["max_abs_diff_fast"] for D in (384, 768))
    out["fraction_of_peak_d384"] = round(d["gflops_per_s"]["fast"] / peak, 3)
    out["fraction_of_peak_d384_folded"] = round(d["gflops_per_s"]["folded"] / peak, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
