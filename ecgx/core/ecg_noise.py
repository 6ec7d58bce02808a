"""Each ECG's own noise level, for noise that does not stand out from the signal.

ROAD's imputation noise (perturbation) and the noise floor of randomisation add
noise to an ECG. A fixed level is wrong for most ECGs: a median beat averages
many beats, so its noise is far below a raw recording's, and an imputed stretch
carrying more noise than its surroundings gives away where samples were removed,
which is what ROAD exists to avoid (Rong et al. 2022). The level is taken from
the ECG itself: the high-frequency residual after a short moving average, its
spread measured robustly (median absolute deviation), so QRS edges do not count
as noise.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter1d

# 5 samples (10 ms at 500 Hz): the residual keeps what lies above about 100 Hz.
SMOOTHING_SAMPLES = 5
# Standard deviation of a normal distribution per unit of median absolute deviation.
MAD_TO_SD = 1.4826


def high_frequency_sd(x: np.ndarray) -> np.ndarray:
    """(B, leads, 1) robust standard deviation of each lead's high-frequency residual, in mV."""
    x = np.asarray(x, np.float64)
    residual = x - uniform_filter1d(x, SMOOTHING_SAMPLES, axis=-1, mode="nearest")
    centred = residual - np.median(residual, axis=-1, keepdims=True)
    return MAD_TO_SD * np.median(np.abs(centred), axis=-1, keepdims=True)


def high_frequency_noise(x: np.ndarray, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Gaussian noise shaped like ``x``, per lead at ``scale`` times its own residual's level."""
    sd = high_frequency_sd(x) * scale
    return (rng.standard_normal(x.shape) * sd).astype(np.float32)
