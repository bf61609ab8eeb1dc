"""ROIAlign on the CPU as one sparse matrix product: the same numbers as Detectron2's ``ROIAlign``, vectorised.

torchvision's CPU ``roi_align`` kernel works output sample by output sample, and its backward recomputes every
sample's bilinear weights once per channel; in an R-CNN training step on the CPU that backward is one of the largest
costs after the convolutions (docs/time_to_accuracy.md, "ROIAlign on the CPU"). ROIAlign (He et al., Mask R-CNN,
Sec. 3) is linear in the features: each output is a fixed weighted sum of feature pixels (bilinear weights of the
bin's regular sample points, averaged). So the weights of all boxes are built once as a sparse ``(boxes x bins) x
pixels`` matrix and the pooling is ``torch.sparse.mm`` with the ``pixels x channels`` features; its backward is the
transposed product. Sample positions, the adaptive number of samples per bin, the clamping at the feature map's
border and the zeros beyond it follow torchvision's kernel, so outputs and gradients agree to float rounding
(``tests/test_roi_align.py``).

``MODEL.ROI_ALIGN_CPU`` ("sparse", default, or "torchvision") chooses; :func:`use_sparse_roi_align` swaps the modules
of a built model. The sparse product pays where gradients flow (training); inference without gradients, CUDA, and
tracing or exporting run torchvision's op as before.
"""

from __future__ import annotations

import torch
from detectron2.layers import ROIAlign
from torch import nn

__all__ = ["SparseROIAlign", "roi_align_sparse", "use_sparse_roi_align"]


def _bin_samples(roi_size: torch.Tensor, bins: int, sampling_ratio: int) -> torch.Tensor:
    """Samples per bin along one axis, per box: fixed, or ``ceil(size / bins)`` (torchvision's adaptive rule)."""
    if sampling_ratio > 0:
        return torch.full_like(roi_size, sampling_ratio, dtype=torch.int64)
    return torch.ceil(roi_size / bins).to(torch.int64)


def _axis_weights(start: torch.Tensor, size: torch.Tensor, bins: int, samples: int, length: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear neighbours along one axis of ``bins x samples`` regular points in each box: indices and weights,
    both ``R x (bins * samples) x 2``, with torchvision's rules (clamped to the map; zero beyond one pixel outside)."""
    t = (torch.arange(bins * samples, dtype=start.dtype, device=start.device) + 0.5) / (bins * samples)
    p = start[:, None] + t[None] * size[:, None]
    valid = (p >= -1.0) & (p <= length)
    p = p.clamp(min=0.0)
    low = p.floor().to(torch.int64)
    top = low >= length - 1
    low = torch.where(top, torch.full_like(low, length - 1), low)
    p = torch.where(top, low.to(p.dtype), p)
    high = torch.where(top, low, low + 1)
    frac = p - low.to(p.dtype)
    weights = torch.stack([1.0 - frac, frac], dim=-1) * valid[..., None].to(p.dtype)
    return torch.stack([low, high], dim=-1), weights


def roi_align_sparse(input: torch.Tensor, rois: torch.Tensor, output_size: int | tuple[int, int],
                     spatial_scale: float, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """``torchvision.ops.roi_align(input, rois, ...)`` as one sparse matrix product (see the module docstring).

    Args:
        input: ``N x C x H x W`` features.
        rois: ``R x 5`` boxes (image index, x0, y0, x1, y1) in input-image coordinates.
        output_size: (height, width) of the pooled features, or one int for both.
        spatial_scale: feature-map size / image size.
        sampling_ratio: samples per bin along each axis; 0 = ``ceil(box size / bins)`` per box.
        aligned: shift the box by -0.5 feature pixel (Detectron2's ROIAlignV2).

    Returns:
        ``R x C x output_size`` in the input's dtype (computed in float32, as torchvision's autocast does).
    """
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else (int(output_size[0]), int(output_size[1]))
    dtype = input.dtype
    x = input.float()
    n, c, height, width = x.shape
    r_all = rois.shape[0]
    if r_all == 0:
        return x.new_zeros((0, c, ph, pw)).to(dtype)
    boxes = rois[:, 1:].detach().float() * spatial_scale - (0.5 if aligned else 0.0)  # boxes get no gradient
    roi_w, roi_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if not aligned:  # the legacy kernel forces boxes to at least one pixel
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    sh, sw = _bin_samples(roi_h, ph, sampling_ratio), _bin_samples(roi_w, pw, sampling_ratio)
    groups, inverse = torch.unique(torch.stack([sh, sw], dim=1), dim=0, return_inverse=True)
    image = rois[:, 0].to(torch.int64)
    rows, cols, vals = [], [], []
    for g, (s_h, s_w) in enumerate(groups.tolist()):
        if s_h <= 0 or s_w <= 0:  # an empty box: torchvision averages no sample, i.e. returns zeros
            continue
        idx = torch.nonzero(inverse == g).flatten()
        yi, yw = _axis_weights(boxes[idx, 1], roi_h[idx], ph, s_h, height)  # r x ph*s_h x 2
        xi, xw = _axis_weights(boxes[idx, 0], roi_w[idx], pw, s_w, width)
        bin_y = torch.arange(ph * s_h, device=x.device) // s_h
        bin_x = torch.arange(pw * s_w, device=x.device) // s_w
        shape = (idx.numel(), ph * s_h, pw * s_w, 2, 2)  # box, y sample, x sample, y neighbour, x neighbour
        row = idx[:, None, None, None, None] * (ph * pw) + bin_y[None, :, None, None, None] * pw \
            + bin_x[None, None, :, None, None]
        col = image[idx, None, None, None, None] * (height * width) + yi[:, :, None, :, None] * width \
            + xi[:, None, :, None, :]
        val = yw[:, :, None, :, None] * xw[:, None, :, None, :] / float(s_h * s_w)
        rows.append(row.expand(shape).reshape(-1))
        cols.append(col.expand(shape).reshape(-1))
        vals.append(val.expand(shape).reshape(-1))
    if not rows:
        return x.new_zeros((r_all, c, ph, pw)).to(dtype)
    # duplicates (two samples reading one pixel for one bin) are summed by the product, as they should be
    weights = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals),
                                      (r_all * ph * pw, n * height * width), check_invariants=False)
    pixels = x.permute(0, 2, 3, 1).reshape(n * height * width, c)  # a view when the input is channels-last
    with torch.autocast(x.device.type, enabled=False):  # float32 like torchvision's autocast; mm would go bfloat16
        out = torch.sparse.mm(weights, pixels)
    return out.reshape(r_all, ph, pw, c).permute(0, 3, 1, 2).to(dtype)


class SparseROIAlign(ROIAlign):
    """Detectron2's ``ROIAlign`` that pools with :func:`roi_align_sparse` where that is faster: on the CPU when
    gradients are recorded (training). Without gradients (inference) torchvision's forward kernel, which precomputes
    its sample weights once per box, is the faster one and runs as before; so does CUDA, and tracing or exporting,
    where the data-dependent grouping would not record."""

    def forward(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if (input.device.type != "cpu" or not torch.is_grad_enabled() or input.is_quantized
                or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling()):
            return super().forward(input, rois)
        assert rois.dim() == 2 and rois.size(1) == 5
        return roi_align_sparse(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)


def use_sparse_roi_align(model: nn.Module) -> int:
    """Replace every Detectron2 ``ROIAlign`` in ``model`` by a :class:`SparseROIAlign` with the same settings
    (``MODEL.ROI_ALIGN_CPU "sparse"``); returns how many were replaced. They hold no weights, so checkpoints
    are unaffected."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is ROIAlign:
                module._modules[name] = SparseROIAlign(child.output_size, child.spatial_scale, child.sampling_ratio,
                                                       child.aligned)
                swapped += 1
    return swapped
