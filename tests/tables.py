"""Seeded synthetic tables like real ones: numeric, boolean and text columns, all with missing values."""

from __future__ import annotations

import numpy as np
import pandas as pd

from models.data import load_default


def mixed_table(rows: int = 400, classes: int = 2, regression: bool = False, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.normal(45, 12, rows).round()
    income = rng.lognormal(10, 0.5, rows)
    city = rng.choice(["paris", "lyon", "nice", "lille"], rows)
    member = rng.random(rows) < 0.4
    signal = (age - 45) / 12 + (city == "paris") * 1.5 - (city == "nice") * 1.0 + member * 0.8
    signal += rng.normal(0, 0.5, rows)
    frame = pd.DataFrame(
        {
            "age": age,
            "income": income,
            "city": city,
            "member": member.astype(object),
            "customer_id": range(rows),
        }
    )
    if regression:
        frame["spend"] = 100 + 40 * signal
    else:
        edges = np.quantile(signal, np.linspace(0, 1, classes + 1)[1:-1])
        labels = np.array(["low", "mid", "high", "top", "max"][:classes])
        frame["segment"] = labels[np.searchsorted(edges, signal)]
    for column in ["age", "income", "city", "member"]:
        frame.loc[rng.random(rows) < 0.08, column] = None
    return frame


def with_many_shops(rows: int = 1500) -> pd.DataFrame:
    """mixed_table plus a column of 120 shops, most of them rare: the encoder pools them (max_categories)."""
    table = mixed_table(rows)
    rng = np.random.default_rng(1)
    return table.assign(shop=[f"s{int(v)}" for v in rng.zipf(1.3, rows) % 120])


def breast_cancer_table() -> pd.DataFrame:
    """The bundled data as a CSV-ready table."""
    table = load_default()
    return table.features.assign(**{str(table.target.name): table.target.to_numpy()})


def shuffle_labels(frame: pd.DataFrame, target: str, share: float, seed: int = 0) -> pd.DataFrame:
    """A copy whose labels are shuffled among a random `share` of the rows: corrupted labels with the same
    class counts."""
    rng = np.random.default_rng(seed)
    frame = frame.copy()
    chosen = np.flatnonzero(rng.random(len(frame)) < share)
    frame.loc[frame.index[chosen], target] = rng.permutation(frame[target].to_numpy()[chosen])
    return frame
