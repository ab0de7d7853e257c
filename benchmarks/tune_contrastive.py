"""Tile-size sweep of the contrastive kernels on the GPU (bf16, D = 512): prints ms per kernel and config.

Each config is forced through COSMOS_FAST_CONTRASTIVE_CONFIG="BM,BN,BK,BDO,WARPS,STAGES"; the forward
and the backward are timed separately (median of do_bench) so their defaults can be chosen independently.
"""
import argparse
import itertools
import os

import torch
import torch.nn.functional as F


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tune_contrastive: no CUDA device, nothing to tune")
        return
    import triton

    from cosmos_fast.ops.contrastive import triton_kernels as tk

    n, d = args.n, args.d
    rows = F.normalize(torch.randn(1, n, d, device="cuda"), dim=-1).bfloat16()
    cols = F.normalize(torch.randn(1, n, d, device="cuda"), dim=-1).bfloat16()
    scale = torch.tensor(14.0, device="cuda")
    grad = torch.full((1, 1, n), 0.5 / n, device="cuda")
    fwd = lambda: tk.infonce_rows_fwd(rows, cols, None, scale, 0, None, None, None, 0.0, None)  # noqa: E731
    _, lse, tlse = fwd()

    def bwd(need_rows, need_cols):
        return tk.infonce_rows_bwd(grad, rows, cols, None, scale, 0, None, None, None, 0.0, None, lse, tlse,
                                   need_rows, need_cols)

    def symmetric_bwd():
        return tk.infonce_symmetric_bwd(grad, grad, rows, cols, scale, None, None, None, 0.0, None, lse, lse,
                                        tlse, tlse, True, True)

    tiles = [(128, 64, 64), (128, 128, 64), (64, 128, 64), (64, 64, 64), (128, 128, 32), (128, 64, 128)]
    launch = [(8, 3), (4, 3), (8, 4), (4, 4)]
    bdos = [128, 256, 512]
    if args.quick:
        tiles, launch, bdos = tiles[:2], launch[:2], bdos[1:2]
    print(f"N={n} D={d} bf16; one matmul pass = {2 * n * n * d / 1e12:.2f} TFLOP")
    # The forward does not use BDO; the backward is swept over fewer tiles but every BDO.
    # "symmetric" is the single-process backward (two rows-kernel passes); "cols" times the generic cols
    # kernel plus the rows kernel's dL/ds-only pass.
    sweeps = [("fwd", fwd, itertools.product(tiles, launch, bdos[:1])),
              ("symmetric", symmetric_bwd, itertools.product(tiles[:4], launch[:2], bdos)),
              ("cols", lambda: bwd(False, True), itertools.product(tiles[:2], launch[:1], bdos))]
    for name, fn, configs in sweeps:
        results = []
        for (bm, bn, bk), (warps, stages), bdo in configs:
            config = f"{bm},{bn},{bk},{bdo},{warps},{stages}"
            os.environ["COSMOS_FAST_CONTRASTIVE_CONFIG"] = config
            try:
                results.append((triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), config))
            except Exception as exc:  # out of shared memory / registers for this tile: skip it
                print(f"  {name} {config}: {type(exc).__name__}: {str(exc)[:80]}")
        results.sort()
        print(f"{name}: best " + ", ".join(f"{config} {ms:.2f} ms" for ms, config in results[:5]), flush=True)
    os.environ.pop("COSMOS_FAST_CONTRASTIVE_CONFIG")


if __name__ == "__main__":
    main()
