"""ECGs to the input of a model brought from elsewhere: its own length and sampling rate (issue #12)."""

from __future__ import annotations

import numpy as np
import pytest

from ecgx.core.errors import InvalidArgument
from ecgx.core.schema import LEADS
from ecgx.service.ecg_input import ModelInput, decode_ecgs
from ecgx.service.proto_gen.ecgx.v1 import ecgx_pb2 as pb

WINDOW = ModelInput(samples=1000, rate_hz=100.0, median_beat=False)


def ecg(x: np.ndarray, fs: float) -> pb.Ecg:
    x = np.asarray(x, dtype="<f4")
    return pb.Ecg(
        leads=list(LEADS),
        sampling_rate_hz=fs,
        units=pb.MILLIVOLT,
        samples_per_lead=x.shape[-1],
        samples=x.tobytes(),
    )


def sine(hz: float, fs: float, seconds: float) -> np.ndarray:
    t = np.arange(round(seconds * fs)) / fs
    return np.tile(0.5 * np.sin(2 * np.pi * hz * t), (12, 1))


def test_a_window_at_the_models_rate_and_length_passes_unchanged():
    x = sine(1.3, 100.0, 10.0)
    out, from_strip = decode_ecgs([ecg(x, 100.0)], LEADS, WINDOW)
    assert out.shape == (1, 12, 1000) and from_strip == [False]
    np.testing.assert_array_equal(out[0], x.astype(np.float32))


def test_a_longer_strip_at_another_rate_is_resampled_and_its_first_window_taken():
    """12 s at 500 Hz of a 2 Hz sine become the model's 10 s at 100 Hz, the same sine."""
    out, from_strip = decode_ecgs([ecg(sine(2.0, 500.0, 12.0), 500.0)], LEADS, WINDOW)
    assert out.shape == (1, 12, 1000) and from_strip == [True]
    expected = sine(2.0, 100.0, 10.0)
    # Away from the filter's edge the resampled signal is the sine itself.
    np.testing.assert_allclose(out[0, :, 50:950], expected[:, 50:950], atol=5e-3)


def test_a_strip_shorter_than_the_models_window_is_refused_with_both_lengths():
    with pytest.raises(
        InvalidArgument, match=r"ecgs\[0\]: the ECG is 8.00 s long .*takes 1000 samples at 100 Hz"
    ):
        decode_ecgs([ecg(sine(2.0, 500.0, 8.0), 500.0)], LEADS, WINDOW)


def test_a_manifest_without_an_input_kind_holds_median_beats():
    spec = ModelInput.of_manifest({"input": {"shape": [None, 12, 600], "sampling_rate_hz": 500}})
    assert spec == ModelInput(600, 500.0, True)
    window = {"input": {"shape": [None, 12, 1000], "sampling_rate_hz": 100, "kind": "window"}}
    assert ModelInput.of_manifest(window) == WINDOW
