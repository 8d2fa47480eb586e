"""The largest magnitude of each numeric feature that the fitted pipeline turns into a finite model input.

A finite value can still be too large for the model: 1e308 in a standardized column overflows to infinity,
and scikit-learn then refuses the whole call ("Input X contains infinity or a value too large"), failing
every request that shares it. Such a value is bad input, so the service refuses it up front, naming the
field. The rule: a value is accepted if the pipeline's preprocessing turns it into a number that is finite
in float32, the precision tree ensembles score in (and far beyond any real measurement for the others).

The limit is measured, not derived from the pipeline's structure: a probe of one ordinary row per feature,
sign and power of ten (10^0 .. 10^308) goes through the preprocessing in one call (a few tens of ms),
and each feature's limit is the largest power of ten below its first overflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from models.schema import FeatureKind, FeatureSchema

if TYPE_CHECKING:  # imported by joblib with the model; see split() in models/data.py
    from sklearn.pipeline import Pipeline

EXPONENTS = np.arange(0, 309)  # 10^308 is the largest power of ten in float64
FLOAT32_MAX = float(np.finfo(np.float32).max)


def finite_limits(pipeline: Pipeline, schema: FeatureSchema, ordinary_row: pd.DataFrame) -> dict[str, float]:
    """Per numeric feature, the largest power of ten whose value, positive or negative, in `ordinary_row`
    (one prepared row, e.g. of the reference set) the preprocessing keeps within float32."""
    numeric = schema.names_of(FeatureKind.NUMERIC)
    if not numeric:
        return {}
    magnitudes = np.power(10.0, EXPONENTS)
    signed = np.concatenate([magnitudes, -magnitudes])  # one block of probe rows per feature
    probe = pd.concat([ordinary_row.iloc[[0]]] * (len(numeric) * len(signed)), ignore_index=True)
    for index, name in enumerate(numeric):
        column = probe[name].to_numpy(dtype=np.float64, copy=True)
        column[index * len(signed) : (index + 1) * len(signed)] = signed
        probe[name] = column
    with np.errstate(all="ignore"):  # the overflows are what is measured
        model_input = np.asarray(_preprocess(pipeline, probe), dtype=np.float64)
        fits = np.all(np.abs(model_input) <= FLOAT32_MAX, axis=1).reshape(len(numeric), 2, len(magnitudes))
    limits = {}
    for name, (positive, negative) in zip(numeric, fits, strict=True):
        overflows = np.flatnonzero(~(positive & negative))
        last_fitting = int(overflows[0] if len(overflows) else len(magnitudes)) - 1
        limits[name] = float(magnitudes[last_fitting]) if last_fitting >= 0 else 0.0
    return limits


def _preprocess(pipeline: Pipeline, frame: pd.DataFrame) -> object:
    """What the final estimator receives: the output of every step before it (the frame itself for a bare
    estimator)."""
    steps = getattr(pipeline, "steps", None)
    if not steps or len(steps) < 2:
        return frame.select_dtypes("number")
    transformed = pipeline[:-1].transform(frame)
    return transformed.toarray() if hasattr(transformed, "toarray") else transformed  # sparse one-hot
