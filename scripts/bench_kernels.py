"""Benchmark vtprune.kernels: torch vs Triton, time and achieved bandwidth per op and shape, to a CSV.

    python scripts/bench_kernels.py                      # default shapes -> out/bench_kernels.csv
    python scripts/bench_kernels.py --ops gather,pack --batch 1,2,4,8 --dtype fp16 --peak-gbps 2039

Shapes follow the models vtprune targets: LLaVA-1.5 (576 visual + 44 text tokens, D=4096, 32 heads;
keep 64 / 144 / 288 visual tokens), Qwen2-VL-7B-ish (1296 visual tokens, D=3584, 28 query / 4 kv heads,
M-RoPE positions) and a video prompt (10k tokens). ``gb_per_s`` counts every tensor an op must touch
once (reads + writes; the minimum traffic), so it is comparable with the device's DRAM bandwidth.

Without CUDA only the torch provider is measured: the Triton interpreter's timings mean nothing, and
compiled Triton needs a GPU. Goal on a GPU (not measurable here): the gather at >= 80 % of DRAM bandwidth
(pass ``--peak-gbps`` to print the fraction).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Spin-waiting OpenMP threads are ~10x slower on shared cores; must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import vtprune.kernels as K  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLUMNS = ["op", "provider", "shape", "dtype", "ms_median", "ms_min", "ms_max", "gb_per_s"]
TEXT = 44  # text tokens of a LLaVA-1.5 prompt around the image


@dataclass
class Case:
    op: str
    shape: str
    nbytes: int  # minimum traffic in bytes
    run: Callable[[str], object]  # provider -> result


def _keep(B: int, L: int, visual: range, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, valid) (B, L') keeping all text and k visual tokens per row (the same k: no padding)."""
    vis = torch.tensor(list(visual), device=device)
    text = torch.tensor([i for i in range(L) if i not in set(visual)], device=device)
    rows = [torch.cat([text, vis[torch.randperm(len(vis), device=device)[:k]]]) for _ in range(B)]
    index = torch.stack(rows).sort(1).values  # (B, L') kept rows in their original order
    return index, torch.ones_like(index, dtype=torch.bool)


def gather_cases(batches: list[int], dtype: torch.dtype, device: str, packed: bool) -> Iterator[Case]:
    el = torch.tensor([], dtype=dtype).element_size()
    configs = [("llava1.5", L, D, 1, range(5, 5 + 576), k) for L, D in [(620, 4096)] for k in (64, 144, 288)]
    configs += [("qwen2vl", 1340, 3584, 3, range(15, 15 + 1296), 324),
                ("video", 10_240, 3584, 3, range(40, 40 + 10_160), 2540)]
    for name, L, D, R, visual, k in configs:
        for B in batches if name == "llava1.5" else batches[:1]:
            hidden = torch.randn(B, L, D, device=device, dtype=dtype)
            index, valid = _keep(B, L, visual, k, device)
            pos = torch.arange(L, device=device).expand(R, B, L).contiguous() if R > 1 else \
                torch.arange(L, device=device).expand(B, L).contiguous()
            mask = torch.ones(B, L, dtype=torch.long, device=device)
            n = index.numel()
            # hidden rows read + written, positions read + written, index/valid read, mask read + written
            nbytes = 2 * n * D * el + 2 * R * n * 8 + n * (8 + 1) + (0 if packed else 2 * n * 8)
            shape = f"{name} B={B} L={L} D={D} keep={index.shape[1]}" + (" mrope" if R > 1 else "")
            if packed:
                run = lambda p, h=hidden, i=index, v=valid, q=pos: K.pack_varlen(h, i, v, q, backend=p)  # noqa: E731
            else:
                run = lambda p, h=hidden, i=index, v=valid, q=pos, m=mask: K.gather_sequence(  # noqa: E731
                    h, i, v, q, m, backend=p)
            yield Case("pack_varlen" if packed else "gather_sequence", shape, nbytes, run)


def attention_cases(batches: list[int], dtype: torch.dtype, device: str) -> Iterator[Case]:
    el = torch.tensor([], dtype=dtype).element_size()
    # (name, H, Hkv, Tq query rows, L keys, head dim)
    configs = [("llava1.5 last-token", 32, 32, 1, 620, 128), ("llava1.5 text rows", 32, 32, TEXT, 620, 128),
               ("qwen2vl text rows", 28, 4, 40, 1340, 128), ("video text rows", 28, 4, 80, 10_240, 128)]
    for name, H, Hkv, Tq, L, d in configs:
        for B in batches if name.startswith("llava") else batches[:1]:
            q = torch.randn(B, H, Tq, d, device=device, dtype=dtype)
            k = torch.randn(B, Hkv, L, d, device=device, dtype=dtype)
            key_valid = torch.ones(B, L, dtype=torch.bool, device=device)
            query_pos = torch.full((B, Tq), L - 1, device=device)
            nbytes = (q.numel() + k.numel()) * el + key_valid.numel() + query_pos.numel() * 8 + B * L * 4
            run = lambda p, q=q, k=k, kv=key_valid, qp=query_pos: K.attention_rows(  # noqa: E731
                q, k, scale=q.shape[-1] ** -0.5, key_valid=kv, query_pos=qp, backend=p)
            yield Case("attention_rows", f"{name} B={B} H={H} Hkv={Hkv} Tq={Tq} L={L} d={d}", nbytes, run)


def greedy_cases(batches: list[int], dtype: torch.dtype, device: str, ops: set[str]) -> Iterator[Case]:
    el = torch.tensor([], dtype=dtype).element_size()
    N, D, M, k = 576, 4096, 620, 64  # LLaVA-1.5 projected tokens; coverage rows = text + visual tokens
    for S in batches:
        x = torch.randn(S, N, D, device=device, dtype=dtype)
        first = torch.zeros(S, dtype=torch.long, device=device)
        step = S * N * D * 4  # one read of the normalised fp32 tokens per step
        if "kcenter" in ops:
            yield Case("greedy_kcenter", f"llava1.5 S={S} N={N} D={D} k={k}", x.numel() * el + (k - 1) * step,
                       lambda p, x=x, f=first: K.greedy_kcenter(x, k, f, backend=p))
        if "mmr" in ops:
            imp = torch.rand(S, N, device=device)
            yield Case("greedy_mmr", f"llava1.5 S={S} N={N} D={D} k={k}", x.numel() * el + (k - 1) * step,
                       lambda p, x=x, i=imp: K.greedy_mmr(x, i, k, 0.5, backend=p))
        if "coverage" in ops:
            cov = torch.rand(S, M, N, device=device, dtype=dtype)
            yield Case("greedy_coverage", f"llava1.5 S={S} M={M} N={N} k={k}", k * cov.numel() * el,
                       lambda p, c=cov: K.greedy_coverage(c, k, backend=p))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):  # also triggers Triton compilation / autotuning
        fn()
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="gather,pack,attention,kcenter,mmr,coverage",
                    help="comma list of gather, pack, attention, kcenter, mmr, coverage")
    ap.add_argument("--batch", default="1,8", help="batch sizes (LLaVA shapes; the others use the first)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--providers", default="torch,triton")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 20 on GPU, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls first (default: 5 on GPU, 1 on CPU)")
    ap.add_argument("--peak-gbps", type=float, default=None,
                    help="device DRAM bandwidth, to print the fraction")
    ap.add_argument("--out", type=Path, default=Path("out/bench_kernels.csv"))
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    reps = args.reps or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    ops = set(args.ops.split(","))
    providers = [p for p in args.providers.split(",") if p]
    if "triton" in providers and not (cuda and K.triton_available()):
        providers.remove("triton")
        why = "CUDA is not available" if not cuda else "triton is not installed"
        print(f"Triton figures need a GPU ({why}): only the torch provider is measured. "
              "Goal on a GPU: gather_sequence at >= 80% of DRAM bandwidth.")
    batches = [int(b) for b in args.batch.split(",")]
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)

    def cases() -> Iterator[Case]:
        if "gather" in ops:
            yield from gather_cases(batches, dtype, device, packed=False)
        if "pack" in ops:
            yield from gather_cases(batches, dtype, device, packed=True)
        if "attention" in ops:
            yield from attention_cases(batches, dtype, device)
        yield from greedy_cases(batches, dtype, device, ops)

    rows = []
    for case in tqdm(list(cases()), desc="bench_kernels", unit="case"):
        for provider in providers:
            ms = time_ms(lambda c=case, p=provider: c.run(p), device, reps, warmup)
            med = statistics.median(ms)
            rows.append(dict(op=case.op, provider=provider, shape=case.shape, dtype=args.dtype,
                             ms_median=f"{med:.4f}", ms_min=f"{min(ms):.4f}", ms_max=f"{max(ms):.4f}",
                             gb_per_s=f"{case.nbytes / med / 1e6:.2f}"))
            peak = f" ({case.nbytes / med / 1e6 / args.peak_gbps:.0%} of peak)" if args.peak_gbps else ""
            tqdm.write(f"{case.op:16s} {provider:6s} {case.shape:55s} {med:9.3f} ms "
                       f"{case.nbytes / med / 1e6:8.1f} GB/s{peak}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out} ({device}, {args.dtype})")


if __name__ == "__main__":
    main()
