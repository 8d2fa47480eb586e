"""The promotion gate: does a new version take the `champion` alias from the current one?

Every version is scored, beside a dummy baseline (a constant predictor fitted on the same training split),
on two sets of held-out rows:

- the *new* held-out rows: this run's test split, which the champion is scored on too, so the comparison
  is fair when the data changed;
- the *trusted* rows: the champion's own held-out rows, kept with its MLflow run. If the new
  labels are corrupted, the new rows are too, and champion and newcomer both score badly there; only the
  champion's rows show the newcomer learnt the wrong thing.

The newcomer is promoted only if it beats the dummy baseline on both sets, beats the champion on the new
rows by more than `margin`, and loses at most `tolerance` (a share of the champion's score) on the trusted
rows. A newcomer that wins on the new rows and loses only on the trusted ones is named as such: label noise
or a change of concept, which the data alone cannot tell apart.

MLflow's `validate_evaluation_results` is not used: its `min_absolute_change` must be positive and passes
on `>=`, so it can state neither "a tie is not better" (at margin 0) nor "may lose by at most the
tolerance" (a negative change), and its verdict is one exception message, where the gate records each
check's figures. The decision is a pure function of the scores so that it can be read and tested alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from models.evaluation import Metric
from models.registry import CHALLENGER, CHAMPION


@dataclass(frozen=True)
class HeldOutScores:
    """One metric on one set of held-out rows: the new version, the champion and the dummy baseline."""

    new: float
    champion: float
    baseline: float


@dataclass(frozen=True)
class ChampionScores:
    version: str
    new_rows: HeldOutScores | None = None
    trusted_rows: HeldOutScores | None = None  # the champion's own held-out rows
    incomparable: str | None = None  # why the champion or its rows could not be scored

    def figures(self) -> dict[str, float]:
        """The scores, flat ("trusted_rows_champion": 0.99, ...), for MLflow metrics and store metadata."""
        sets = {"new_rows": self.new_rows, "trusted_rows": self.trusted_rows}
        return {
            f"{rows}_{model}": value
            for rows, scores in sets.items()
            if scores is not None
            for model, value in asdict(scores).items()
        }


@dataclass(frozen=True)
class Decision:
    promote: bool
    forced: bool
    reason: str
    failed: tuple[str, ...] = ()  # the names of the checks that said no

    @property
    def alias(self) -> str:
        return CHAMPION if self.promote else CHALLENGER


def decide_first(metric: Metric, new: float, baseline: float, force: bool) -> Decision:
    """No champion yet. Even a first version must beat a constant: so every champion that was not forced
    did so on the held-out rows that later vouch for it."""
    if metric.improvement(new, baseline) > 0:
        return Decision(promote=True, forced=False, reason="first version: no champion yet")
    why = f"first version no better than the dummy baseline: {metric.name} {new:.4f} vs {baseline:.4f}"
    return _refused(why, ("baseline_new_rows",), force)


def decide(
    metric: Metric, champion: ChampionScores, margin: float, tolerance: float, force: bool
) -> Decision:
    if champion.incomparable is not None or champion.new_rows is None or champion.trusted_rows is None:
        why = f"cannot compare with champion v{champion.version}: {champion.incomparable}"
        return _refused(why, ("comparable",), force)
    new_rows, trusted_rows = champion.new_rows, champion.trusted_rows
    on_new = f"on the new held-out rows {_gain(metric, champion.version, new_rows, margin)}"
    on_trusted = (
        f"on champion v{champion.version}'s own held-out rows "
        f"{_loss(metric, champion.version, trusted_rows, tolerance)}"
    )
    failures = {
        "baseline_new_rows": _below_baseline(metric, "the new held-out rows", new_rows),
        "baseline_trusted_rows": _below_baseline(
            metric, f"champion v{champion.version}'s own held-out rows", trusted_rows
        ),
        "champion_new_rows": None if _gains(metric, new_rows, margin) else on_new,
        "champion_trusted_rows": None if _holds(metric, trusted_rows, tolerance) else on_trusted,
    }
    failed = tuple(name for name, failure in failures.items() if failure is not None)
    if not failed:
        baselines = f"dummy baseline {new_rows.baseline:.4f} / {trusted_rows.baseline:.4f}"
        return Decision(promote=True, forced=False, reason=f"better: {on_new}; {on_trusted}; {baselines}")
    if failed == ("champion_trusted_rows",):
        why = (
            f"wins {on_new} but loses {on_trusted}: label noise or a change of concept: "
            "a person decides with --force"
        )
        return _refused(why, failed, force, hint="")
    why = "not better: " + "; ".join(str(failures[name]) for name in failed)
    return _refused(why, failed, force)


def _refused(
    why: str, failed: tuple[str, ...], force: bool, hint: str = "; use --force to promote anyway"
) -> Decision:
    if force:
        return Decision(promote=True, forced=True, reason=f"forced; {why}", failed=failed)
    return Decision(promote=False, forced=False, reason=why + hint, failed=failed)


def _below_baseline(metric: Metric, rows: str, scores: HeldOutScores) -> str | None:
    if metric.improvement(scores.new, scores.baseline) > 0:
        return None
    figures = f"{metric.name} {scores.new:.4f} vs {scores.baseline:.4f}"
    return f"no better than the dummy baseline on {rows}: {figures}"


def _gains(metric: Metric, scores: HeldOutScores, margin: float) -> bool:
    return metric.improvement(scores.new, scores.champion) > margin


def _gain(metric: Metric, version: str, scores: HeldOutScores, margin: float) -> str:
    gain = metric.improvement(scores.new, scores.champion)
    verdict = ">" if _gains(metric, scores, margin) else "does not exceed"
    return (
        f"{metric.name} {scores.new:.4f} vs champion v{version} {scores.champion:.4f} "
        f"(gain {gain:+.4f} {verdict} margin {margin:.4f})"
    )


def _allowed_loss(scores: HeldOutScores, tolerance: float) -> float:
    return tolerance * abs(scores.champion)


def _holds(metric: Metric, scores: HeldOutScores, tolerance: float) -> bool:
    return -metric.improvement(scores.new, scores.champion) <= _allowed_loss(scores, tolerance)


def _loss(metric: Metric, version: str, scores: HeldOutScores, tolerance: float) -> str:
    loss = 0.0 - metric.improvement(scores.new, scores.champion)  # 0.0 -: a tie prints +0.0000, not -0.0000
    verdict = "within" if _holds(metric, scores, tolerance) else "beyond"
    return (
        f"{metric.name} {scores.new:.4f} vs champion v{version} {scores.champion:.4f} "
        f"(loss {loss:+.4f} {verdict} tolerance {_allowed_loss(scores, tolerance):.4f} = "
        f"{tolerance * 100:g}% of {scores.champion:.4f})"
    )
