"""GradCAM at the package's GradCAM layer, and Guided GradCAM."""

from __future__ import annotations

import numpy as np

from ecgx.service.methods.base import AttributionMethod, Param, Settings, flag, one_of
from ecgx.service.methods.registry import register

INTERPOLATIONS = ("linear", "nearest")


def upsample(cam: np.ndarray, length: int, mode: str) -> np.ndarray:
    """Resample (B, L) maps to (B, length) as torch's F.interpolate (align_corners=False)."""
    n = cam.shape[-1]
    scale = n / length
    if mode == "nearest":
        src = np.minimum(np.floor(np.arange(length) * scale).astype(np.int64), n - 1)
        return cam[:, src]
    src = np.maximum((np.arange(length) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    w = (src - lo).astype(cam.dtype)
    return cam[:, lo] * (1 - w) + cam[:, hi] * w


def gradcam_map(engine, x: np.ndarray, target: np.ndarray, relu: bool, interpolation: str) -> np.ndarray:
    """Time-resolved GradCAM (B, 600): channel weights = time-mean of the gradients."""
    seeds = engine.selectors(target)
    cams = []
    for sl in engine._chunks(len(x)):
        _, acts, grads = engine.run(
            "gradcam", {"x": x[sl], "seed": seeds[sl]}, ["logits", "activations", "gradients"]
        )
        cam = (grads.mean(axis=2, keepdims=True) * acts).sum(axis=1)
        cams.append(np.maximum(cam, 0) if relu else cam)
    return upsample(np.concatenate(cams), x.shape[2], interpolation)


@register
class GradCam(AttributionMethod):
    """GradCAM (Selvaraju et al.) at the last convolutional block, as Captum's LayerGradCam
    followed by interpolation to 600 samples. Convolutions mix leads from the first
    layer on, so the map is over time only and repeated on every lead."""

    name, kind, graphs = "gradcam", "layer", ("gradcam",)
    params = (Param("relu", True, flag), Param("interpolation", "linear", one_of(INTERPOLATIONS)))

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        cam = gradcam_map(engine, x, target, s.relu, s.interpolation)
        return np.repeat(cam[:, None, :], x.shape[1], axis=1)


@register
class GuidedGradCam(AttributionMethod):
    """Guided backprop x upsampled GradCAM, as Captum's GuidedGradCam."""

    name, kind, graphs = "guided_gradcam", "layer", ("gradcam", "guided_backprop")
    params = (Param("interpolation", "linear", one_of(INTERPOLATIONS)),)

    def cost(self, x, s: Settings) -> int:
        return 2  # a GradCAM pass and a guided backprop pass

    def attribute(self, engine, x, target, s: Settings) -> np.ndarray:
        cam = gradcam_map(engine, x, target, True, s.interpolation)
        return engine.backward("guided_backprop", x, target) * cam[:, None, :]
