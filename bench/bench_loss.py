"""Step time of the fused RaVL training step vs a plain CLIP step at the same batch size.

A step = forward, loss, backward and AdamW update, on synthetic inputs: random images at the tower's input size,
random captions, quadrant boxes (4 regions per image), a quarter of the images with one spurious region, ten
classes with four prompt templates each (text tower frozen, as in the paper, so the class embeddings are computed
once). Modes alternate inside each repeat so that drift of the machine hits both alike. One JSON line per (model,
step); every line carries its overhead over the ``standard`` line; ``ravl`` is the paper's loss (``--image-term
none``), ``ravl-masked`` / ``ravl-counterfactual`` RaVL with ``--image-term masked`` / ``counterfactual`` (the
latter ``mitigate``'s default; the quarter of the images with a spurious region pass the
image tower once / twice more, as copies). A ``kernel`` line times the region-aware loss alone (forward +
backward) against the CLIP loss on embeddings.

    python -m bench.bench_loss                                   # tiny ResNet and ViT, batch 128
    python -m bench.bench_loss --models RN50 --batch-size 32 --repeats 3
    python -m bench.bench_loss --models ravl-tiny-rn,ravl-tiny-rn-112 --torchvision-roialign   # the RoIAlign change
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out


def _train_step(model, batch, class_emb, cfg, optimizer) -> None:
    from ravl_engine.mitigate import mitigation_loss

    loss, _, _ = mitigation_loss(model, batch, class_emb, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _with_torchvision_roialign(step) -> None:
    """Run ``step`` with torchvision's roi_align where the engine would use its matmul form."""
    from torchvision.ops import roi_align

    import ravl_engine.kernels.roialign as kernel

    matmul = kernel.roi_align_matmul
    kernel.roi_align_matmul = lambda f, boxes, *args: roi_align(f, [b.to(f.dtype) for b in boxes], *args)
    try:
        step()
    finally:
        kernel.roi_align_matmul = matmul


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return q[2] - q[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ravl-tiny-rn,ravl-tiny-vit")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--torchvision-roialign",
        action="store_true",
        help="also time the RaVL step with torchvision's roi_align in its backward (the step before "
        "ravl_engine/kernels/roialign.py), as step 'ravl-torchvision-roialign'",
    )
    args = parser.parse_args(argv)

    from ravl_engine.finetune import make_optimizer
    from ravl_engine.kernels.loss import clip_loss, region_aware_loss
    from ravl_engine.mitigate import MitigateConfig, StepBatch, _class_embeddings
    from ravl_engine.models import load_clip

    b, n_classes, templates = (
        args.batch_size,
        10,
        ("a photo of the number {}", "the digit {}", "an image of a {}", "{}"),
    )
    for name in args.models.split(","):
        loaded = load_clip(name, device=args.device)
        model, size = loaded.model, loaded.image_size
        g = torch.Generator().manual_seed(0)
        labels = torch.randint(n_classes, (b,), generator=g)
        half = size / 2
        quads = torch.tensor(
            [[0, 0, half, half], [half, 0, size, half], [0, half, half, size], [half, half, size, size]]
        )
        spurious = torch.zeros(b, 4, dtype=torch.bool)
        spurious[: b // 4, 1] = True
        batch = StepBatch(
            images=torch.randn(b, 3, size, size, generator=g),
            tokens=loaded.tokenizer([f"the digit {int(y)}" for y in labels]),
            labels=labels,
            groups=2 * labels + spurious.any(1).long(),
            boxes=[quads.clone() for _ in range(b)],
            spurious=spurious.reshape(-1),
        ).to(args.device)
        class_tokens = loaded.tokenizer([t.format(c) for c in range(n_classes) for t in templates]).to(args.device)
        optimizer = make_optimizer(model, lr=1e-5, weight_decay=0.1, freeze_text=True)
        with torch.no_grad():
            class_emb = _class_embeddings(model, class_tokens, n_classes)
        model.train()
        steps = {}
        for method in ("standard", "ravl"):  # "ravl": the paper's loss; its default image term is a step below
            cfg = MitigateConfig(train="-", discovery="-", out="-", method=method, image_term="none")

            steps[method] = functools.partial(_train_step, model, batch, class_emb, cfg, optimizer)
        for term in ("masked", "counterfactual"):
            cfg = MitigateConfig(train="-", discovery="-", out="-", method="ravl", image_term=term)
            steps[f"ravl-{term}"] = functools.partial(_train_step, model, batch, class_emb, cfg, optimizer)
        if args.torchvision_roialign:
            cfg = MitigateConfig(train="-", discovery="-", out="-", method="ravl", image_term="none")
            step = functools.partial(_train_step, model, batch, class_emb, cfg, optimizer)
            steps["ravl-torchvision-roialign"] = functools.partial(_with_torchvision_roialign, step)
        for fn in steps.values():
            _time(fn, args.warmup)
        times: dict[str, list[float]] = {m: [] for m in steps}
        for _ in range(args.repeats):
            for method, fn in steps.items():
                times[method] += _time(fn, 1)
        base = statistics.median(times["standard"])
        for method, values in times.items():
            ms = statistics.median(values) * 1e3
            line = {
                "bench": "loss-step",
                "device": args.device,
                "torch": torch.__version__,
                "model": name,
                "step": method,
                "batch": b,
                "regions_per_image": 0 if method == "standard" else 4,
                "ms_median": ms,
                "ms_iqr": _iqr(values) * 1e3,
                "items_per_s": b / (ms / 1e3),
                "overhead_vs_standard": ms / (base * 1e3) - 1,
            }
            print(json.dumps(line), flush=True)

    # the loss kernel alone, on embeddings with gradients
    d = 512
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(b, 4, d, generator=g, device="cpu").to(args.device).requires_grad_(True)
    img = torch.randn(b, d, generator=g).to(args.device).requires_grad_(True)
    txt = torch.randn(b, d, generator=g).to(args.device)
    text = torch.randn(10, d, generator=g).to(args.device)
    mask = torch.ones(b, 4, dtype=torch.bool, device=args.device)
    spur = torch.zeros(b, 4, dtype=torch.bool, device=args.device)
    spur[: b // 4, 1] = True
    labels = torch.randint(10, (b,), generator=g).to(args.device)

    def clip_only() -> None:
        clip_loss(img, txt, 100.0).backward()

    def region_only() -> None:
        l_r, l_a = region_aware_loss(emb, mask, spur, labels, text, reduction="mean")
        (l_r + l_a).backward()

    for fn in (clip_only, region_only):
        _time(fn, args.warmup)
    for label, fn in (("clip_loss", clip_only), ("region_aware_loss", region_only)):
        values = _time(fn, max(20, args.repeats))
        print(
            json.dumps(
                {
                    "bench": "loss-kernel",
                    "device": args.device,
                    "torch": torch.__version__,
                    "kernel": label,
                    "shape": [b, 4, d],
                    "ms_median": statistics.median(values) * 1e3,
                    "ms_iqr": _iqr(values) * 1e3,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
