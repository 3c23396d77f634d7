"""Model cost per preset on this CPU: inference and training ms per 512 px tile at batch 1 and 8
(torch.inference_mode, channels_last) and GFLOPs per tile (torch.utils.flop_counter).

    python benchmarks/bench_model.py [--presets cpu small_objects trees stock] [--tile 512] [--reps 3]
"""

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from geodet.config import load_config
from geodet.model import build_model


def targets(n, tile, gen):
    out = []
    for _ in range(n):
        xy = torch.rand(60, 2, generator=gen) * (tile - 24)
        wh = torch.rand(60, 2, generator=gen) * 14 + 6
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.zeros(60, dtype=torch.int64)})
    return out


def timed(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["cpu", "small_objects", "trees", "stock"])
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}, tile {args.tile} px")
    print("| preset | levels | channels x depth | GFLOPs/tile | infer ms/tile b1 | infer ms/tile b8 | train ms/tile b1 | train ms/tile b8 |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.presets:
        cfg = load_config(name).model
        model = build_model(cfg, tile_size=args.tile).to(memory_format=torch.channels_last)
        x1 = torch.rand(1, 3, args.tile, args.tile).contiguous(memory_format=torch.channels_last)
        x8 = torch.rand(8, 3, args.tile, args.tile).contiguous(memory_format=torch.channels_last)
        model.eval()
        with torch.inference_mode():
            flops = FlopCounterMode(display=False)
            with flops:
                model(x1)
            gflops = flops.get_total_flops() / 1e9
            inf1 = timed(lambda: model(x1), args.reps) * 1000
            inf8 = timed(lambda: model(x8), max(1, args.reps - 1)) * 1000 / 8
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        t1, t8 = targets(1, args.tile, gen), targets(8, args.tile, gen)

        def step(x, t):
            loss = sum(model(x, t).values())
            opt.zero_grad()
            loss.backward()
            opt.step()

        tr1 = timed(lambda: step(x1, t1), args.reps) * 1000
        tr8 = timed(lambda: step(x8, t8), 1) * 1000 / 8
        lv = f"P{cfg.levels[0]}-P{cfg.levels[1]}"
        print(f"| {name} | {lv} | {cfg.channels} x {cfg.head_depth} | {gflops:.1f} | {inf1:.0f} | {inf8:.0f} | {tr1:.0f} | {tr8:.0f} |")


if __name__ == "__main__":
    main()
