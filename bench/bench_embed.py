"""Embedding benchmark: images/s and regions/s of the ``roi`` path vs ``crop`` (crop, resize, encode).

Synthetic images at the tower's input size, grid proposals of 4 (2 x 2) and 16 (4 x 4) regions per image, the
backbone and region head only (no decoding or I/O). One JSON line per configuration.

    python -m bench.bench_embed                                  # tiny ResNet and ViT on CPU
    python -m bench.bench_embed --models RN50 --device cuda      # any open_clip model on a GPU (random init)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time

import torch


def _timed(visual, images, boxes, mode: str, device: torch.device, amp: bool) -> None:
    from ravl_engine.kernels.roi import region_embed

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        region_embed(visual, images, boxes, mode=mode)
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ravl-tiny-rn,ravl-tiny-vit")
    parser.add_argument("--grids", default="2,4", help="regions per image = grid^2")
    parser.add_argument("--modes", default="roi,crop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    from ravl_engine.kernels.roi import supported_modes, tower_kind
    from ravl_engine.models import load_clip
    from ravl_engine.proposers.simple import grid_boxes

    device = torch.device(args.device)
    for name in args.models.split(","):
        loaded = load_clip(name, device=args.device)
        visual = loaded.model.visual
        size = loaded.image_size
        images = torch.randn(args.batch_size, 3, size, size, device=device)
        if tower_kind(visual) == "resnet":  # as ravl-engine embed runs ResNet towers
            visual.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        for grid in (int(g) for g in args.grids.split(",")):
            boxes = [grid_boxes(size, size, grid, grid).to(device) for _ in range(args.batch_size)]
            modes = [m for m in args.modes.split(",") if m in supported_modes(visual)]
            amp = args.dtype == "bfloat16"
            times: dict[str, list[float]] = {m: [] for m in modes}
            for mode in modes:
                _timed(visual, images, boxes, mode, device, amp)  # warm-up
            # modes alternate inside every repeat, so drift in the machine's speed hits them alike
            for _ in range(args.repeats):
                for mode in modes:
                    t0 = time.perf_counter()
                    for _ in range(args.batches):
                        _timed(visual, images, boxes, mode, device, amp)
                    times[mode].append((time.perf_counter() - t0) / args.batches)
            for mode in modes:
                per_batch = statistics.median(times[mode])
                q = statistics.quantiles(times[mode], n=4) if len(times[mode]) > 1 else [per_batch] * 3
                print(
                    json.dumps(
                        {
                            "bench": "embed",
                            "model": name,
                            "mode": mode,
                            "regions_per_image": grid * grid,
                            "device": args.device,
                            "machine": f"{platform.machine()} {os.cpu_count()} cpu",
                            "torch": torch.__version__,
                            "shape": [args.batch_size, 3, size, size],
                            "dtype": args.dtype,
                            "ms_median": 1000 * per_batch,
                            "ms_iqr": 1000 * (q[2] - q[0]),
                            "images_per_s": args.batch_size / per_batch,
                            "items_per_s": args.batch_size * grid * grid / per_batch,
                            "peak_mem_mb": (
                                torch.cuda.max_memory_allocated() / 2**20
                                if device.type == "cuda"
                                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                            ),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
