"""Calibration: fit an attention replacement to the model it replaces, on a few hundred real inputs.

    from attnexport.calibration import calibrate, data
    result = calibrate("model.onnx", "model.calibrated.onnx", lambda m: data.from_npz(m, "calib.npz", 16),
                       method="linear")

recording.py runs the original with each site's Q, K, V and output exposed and keeps them on disk;
op_runner.py runs a candidate op on them; one fit_*.py per method chooses its parameters; output_map.py
fits per-head output maps by sketch-preconditioned least squares; driver.py ties them together and
writes the model (see `attnexport calibrate --help`).
"""

from attnexport.calibration.driver import METADATA_CALIBRATION, CalibrationResult, calibrate, recorded_calibration

__all__ = ["METADATA_CALIBRATION", "CalibrationResult", "calibrate", "recorded_calibration"]
