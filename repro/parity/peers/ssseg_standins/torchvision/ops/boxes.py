"""box_area, nms and batched_nms in plain torch (torchvision's documented semantics, boxes as x1, y1, x2, y2)."""

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of each (x1, y1, x2, y2) box."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou_one_to_many(box: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    top_left = torch.maximum(box[:2], others[:, :2])
    bottom_right = torch.minimum(box[2:], others[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
    return inter / (box_area(box[None])[0] + box_area(others) - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the kept boxes, by decreasing score; a box is dropped when its IoU with a kept one is above
    `iou_threshold`."""
    order = torch.argsort(scores, descending=True)
    keep = []
    while order.numel() > 0:
        best = order[0]
        keep.append(int(best))
        if order.numel() == 1:
            break
        rest = order[1:]
        order = rest[_iou_one_to_many(boxes[best], boxes[rest]) <= iou_threshold]
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """nms within each category of `idxs` (boxes of different categories never suppress each other)."""
    keep = []
    for category in torch.unique(idxs):
        members = torch.nonzero(idxs == category).flatten()
        keep.append(members[nms(boxes[members], scores[members], iou_threshold)])
    if not keep:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    kept = torch.cat(keep)
    return kept[torch.argsort(scores[kept], descending=True)]
