"""GradCAM at the package's GradCAM layer, and Guided GradCAM."""

from __future__ import annotations

import numpy as np

from ecgx.service.methods.base import AttributionMethod, check_bool, check_choice

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
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    seeds = engine.selectors(target)
    cams = []
    for sl in engine._chunks(len(x)):
        _, acts, grads = engine.run(
            "gradcam", {"x": x[sl], "seed": seeds[sl]}, ["logits", "activations", "gradients"]
        )
        cam = (grads.mean(axis=2, keepdims=True) * acts).sum(axis=1)
        cams.append(np.maximum(cam, 0) if relu else cam)
    return upsample(np.concatenate(cams), x.shape[2], interpolation)


class GradCam(AttributionMethod):
    """GradCAM (Selvaraju et al.) at the last convolutional block, as Captum's LayerGradCam
    followed by interpolation to 600 samples. Convolutions mix leads from the first
    layer on, so the map is over time only and repeated on every lead."""

    name, kind = "gradcam", "layer"

    def check(self, x, *, relu: bool = True, interpolation: str = "linear") -> int:
        check_bool("relu", relu)
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        return 1

    def attribute(self, engine, x, target, *, relu: bool = True, interpolation: str = "linear") -> np.ndarray:
        cam = gradcam_map(engine, x, target, relu, interpolation)
        return np.repeat(cam[:, None, :], x.shape[1], axis=1)


class GuidedGradCam(AttributionMethod):
    """Guided backprop x upsampled GradCAM, as Captum's GuidedGradCam."""

    name, kind = "guided_gradcam", "layer"

    def check(self, x, *, interpolation: str = "linear") -> int:
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        return 2  # a GradCAM pass and a guided backprop pass

    def attribute(self, engine, x, target, *, interpolation: str = "linear") -> np.ndarray:
        cam = gradcam_map(engine, x, target, True, interpolation)
        return engine.backward("guided_backprop", x, target) * cam[:, None, :]
