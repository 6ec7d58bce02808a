"""Cost caps of the attribution engine, in one place (README, "Attribution methods").

Memory does not grow with these settings (rows are built and sent to ONNX Runtime in
chunks of ``max_batch``); time does, linearly. The caps refuse requests that would run
for hours or that ask for far more samples than any attribution needs, with a
ValueError naming the parameter, its value and the cap. The per-ECG caps are fixed;
the per-request caps are :class:`~ecgx.service.engine.AttributionEngine` arguments
(``max_request_ecgs``, ``max_request_rows``) whose defaults are below. A served request's whole
cost (every ECG, target and method together) is budgeted by the serving core before any work
(``max_request_cost``, :mod:`ecgx.service.core`, docs/serving.md).
"""

from __future__ import annotations

# Per ECG -------------------------------------------------------------------------------------

# Integrated gradients: one gradient pass per step. Gauss-Legendre quadrature (the default)
# is exact to float32 precision for smooth paths long before this; Captum's examples use 50.
MAX_N_STEPS = 1000
# SmoothGrad, GradientSHAP, Kernel SHAP and LIME: one pass per sample.
MAX_N_SAMPLES = 2000
# GradientSHAP and DeepLIFT-SHAP baselines (DeepLIFT-SHAP runs one pass per baseline).
MAX_BASELINES = 1000
# Occlusion (leads x windows) and feature ablation (lead x window segments): one forward pass
# each. The default window (50 samples, stride 25) needs 12 x 23 = 276; window 1 would need 7200.
MAX_PERTURBATIONS = 2000
# Kernel SHAP and LIME fit a least-squares surrogate on an n_samples x segments matrix per ECG
# (float64, a few copies, SVD time ~ n x segments^2): 2,000,000 entries is 16 MB a copy.
MAX_SURROGATE_ENTRIES = 2_000_000
# Noise standard deviation (mV): inputs are limited to 50 mV, noise beyond that is not an ECG.
MAX_STDEV_MV = 50.0

# Per engine and request ----------------------------------------------------------------------

# Rows sent to ONNX Runtime in one run (``max_batch``): activations of every layer of every row
# exist at once inside a run, so this bounds ONNX Runtime's memory.
MAX_BATCH_ROWS = 1024
# ECGs in one ``attribute`` call: the engine holds a few float32/float64 copies of the inputs
# (baselines, totals), ~29 kB each per ECG.
MAX_REQUEST_ECGS = 4096
# Model passes (forward or backward rows) in one ``attribute`` call: ECGs x passes per ECG.
# The validation gate's default run (256 ECGs, occlusion's 277 passes each) needs ~71,000.
MAX_REQUEST_ROWS = 2_000_000
