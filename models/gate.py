"""The promotion gate: does a new version take the `champion` alias from the current one?

Both are scored on the same held-out rows (the new run's test split), so the comparison is fair even when
the data changed. The decision is a pure function of the scores so that it can be read and tested alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.evaluation import Metric
from models.registry import CHALLENGER, CHAMPION


@dataclass(frozen=True)
class ChampionScore:
    version: str
    score: float | None
    incomparable: str | None = None  # why the champion could not be scored on the new rows


@dataclass(frozen=True)
class Decision:
    promote: bool
    forced: bool
    reason: str

    @property
    def alias(self) -> str:
        return CHAMPION if self.promote else CHALLENGER


def decide(
    metric: Metric, new_score: float, margin: float, force: bool, champion: ChampionScore | None
) -> Decision:
    if champion is None:
        return Decision(promote=True, forced=False, reason="first version: no champion yet")
    if champion.incomparable is not None or champion.score is None:
        why = f"cannot compare with champion v{champion.version}: {champion.incomparable}"
        if force:
            return Decision(promote=True, forced=True, reason=f"forced; {why}")
        return Decision(promote=False, forced=False, reason=f"{why}; use --force to promote anyway")
    gain = metric.improvement(new_score, champion.score)
    scores = f"{metric.name} {new_score:.4f} vs champion v{champion.version} {champion.score:.4f}"
    if gain > margin:
        return Decision(
            promote=True, forced=False, reason=f"better: {scores} (gain {gain:+.4f} > margin {margin:.4f})"
        )
    not_better = f"not better: {scores} (gain {gain:+.4f} does not exceed margin {margin:.4f})"
    if force:
        return Decision(promote=True, forced=True, reason=f"forced; {not_better}")
    return Decision(promote=False, forced=False, reason=not_better)
