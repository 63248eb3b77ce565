"""Learned proposers: torchvision's Faster R-CNN region proposal network and ultralytics YOLO.

Both import their backend inside the factory, so ``import proposers`` stays light. Weights: a torchvision weights
tag or a local state-dict file for ``rpn``; a ``.pt`` file or a model ``.yaml`` (random init) for ``yolo``. Without
network access a download fails at once with a message that says how to pass a local file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ravl_engine.proposers.base import BoxFilter, Proposals, finalize_boxes, register_proposer

logger = logging.getLogger(__name__)


def _missing(package: str, install: str) -> ImportError:
    return ImportError(f"this proposer needs the {package} package: {install}")


class RPNProposer:
    """Proposals of the region proposal network of torchvision's ``fasterrcnn_resnet50_fpn``.

    Scores are the RPN's objectness probabilities. Images are resized by the detector's transform
    (``min_size``/``max_size``) and the boxes mapped back to input pixels.
    """

    def __init__(
        self,
        *,
        weights: str | None = "DEFAULT",
        min_size: int = 800,
        max_size: int = 1333,
        post_nms_top_n: int = 100,
        device: str | torch.device = "cpu",
        box_filter: BoxFilter | None = None,
    ) -> None:
        try:
            from torchvision.models.detection import fasterrcnn_resnet50_fpn  # noqa: PLC0415
        except ImportError as err:
            raise _missing("torchvision", "pip install torchvision") from err
        self.box_filter = box_filter or BoxFilter()
        self.device = torch.device(device)
        local = weights is not None and Path(weights).is_file()
        tag = None if weights is None or local else weights
        try:
            model = fasterrcnn_resnet50_fpn(
                weights=tag,
                weights_backbone=None,
                min_size=min_size,
                max_size=max_size,
                rpn_post_nms_top_n_test=post_nms_top_n,
            )
        except Exception as err:  # download failures surface as URLError/OSError/RuntimeError
            raise RuntimeError(
                f"could not load torchvision detection weights {weights!r} ({err}); with no network pass a local "
                "state-dict file (weights=/path/to/fasterrcnn.pth) or weights=None for a random-init network"
            ) from err
        if local:
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        self.model = model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images: Tensor, *, boxes: Sequence[Tensor | None] | None = None) -> list[Proposals]:
        height, width = int(images.shape[-2]), int(images.shape[-1])
        batch = images.to(self.device, torch.float32)
        image_list, _ = self.model.transform(list(batch))
        features = list(self.model.backbone(image_list.tensors).values())
        rpn = self.model.rpn
        objectness, deltas = rpn.head(features)
        anchors = rpn.anchor_generator(image_list, features)
        per_level = [o[0].numel() for o in objectness]
        from torchvision.models.detection.rpn import concat_box_prediction_layers  # noqa: PLC0415

        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        found, scores = rpn.filter_proposals(proposals, objectness, image_list.image_sizes, per_level)
        out = []
        for b, s, (h, w) in zip(found, scores, image_list.image_sizes, strict=True):
            scale = b.new_tensor([width / w, height / h, width / w, height / h])
            out.append(finalize_boxes((b * scale).cpu(), s.cpu(), height=height, width=width, filt=self.box_filter))
        return out


@register_proposer("rpn")
def build_rpn(**cfg: Any) -> RPNProposer:
    return RPNProposer(**cfg)


class YOLOProposer:
    """Detections of an ultralytics YOLO model, class-agnostic (every detected object is a region)."""

    def __init__(
        self,
        *,
        weights: str = "yolov8n.pt",
        conf: float = 0.05,
        iou: float = 0.7,
        max_det: int = 100,
        imgsz: int = 640,
        device: str = "cpu",
        box_filter: BoxFilter | None = None,
    ) -> None:
        try:
            from ultralytics import YOLO  # noqa: PLC0415
        except ImportError as err:
            raise _missing("ultralytics", "pip install ultralytics") from err
        if weights.endswith(".pt") and not Path(weights).is_file():
            raise FileNotFoundError(
                f"YOLO weights {weights!r} not found; pass a local .pt file, or a model .yaml such as "
                "'yolov8n.yaml' for a random-init network (ravl-engine does not download weights)"
            )
        self.model = YOLO(weights)
        self.conf, self.iou, self.max_det, self.imgsz, self.device = conf, iou, max_det, imgsz, device
        self.box_filter = box_filter or BoxFilter()

    @torch.no_grad()
    def __call__(self, images: Tensor, *, boxes: Sequence[Tensor | None] | None = None) -> list[Proposals]:
        height, width = int(images.shape[-2]), int(images.shape[-1])
        # ultralytics takes HWC uint8 numpy images and handles resizing and the mapping back to input pixels
        arrays = [(img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy() for img in images]
        results: Any = self.model.predict(
            arrays,
            conf=self.conf,
            iou=self.iou,
            max_det=self.max_det,
            imgsz=self.imgsz,
            device=self.device,
            verbose=False,
            agnostic_nms=True,
        )
        out = []
        for res in results:
            b = res.boxes.xyxy.cpu() if res.boxes is not None else torch.zeros(0, 4)
            s = res.boxes.conf.cpu() if res.boxes is not None else torch.zeros(0)
            out.append(finalize_boxes(b, s, height=height, width=width, filt=self.box_filter))
        return out


@register_proposer("yolo")
def build_yolo(**cfg: Any) -> YOLOProposer:
    return YOLOProposer(**cfg)
