"""The promotion gate's decision, alone: every branch."""

from models.evaluation import METRICS
from models.gate import ChampionScore, decide

AUC, RMSE = METRICS["roc_auc"], METRICS["rmse"]


def test_first_version_becomes_champion() -> None:
    decision = decide(AUC, 0.9, margin=0.0, force=False, champion=None)
    assert decision.promote
    assert decision.alias == "champion"
    assert not decision.forced


def test_better_by_more_than_the_margin_is_promoted() -> None:
    assert decide(AUC, 0.95, 0.01, False, ChampionScore("3", 0.93)).promote
    assert not decide(AUC, 0.935, 0.01, False, ChampionScore("3", 0.93)).promote


def test_a_tie_is_not_better() -> None:
    decision = decide(AUC, 0.93, 0.0, False, ChampionScore("3", 0.93))
    assert not decision.promote
    assert decision.alias == "challenger"
    assert "not better" in decision.reason


def test_lower_is_better_for_losses() -> None:
    assert decide(RMSE, 9.0, 0.0, False, ChampionScore("1", 10.0)).promote
    assert not decide(RMSE, 11.0, 0.0, False, ChampionScore("1", 10.0)).promote


def test_force_promotes_and_says_so() -> None:
    decision = decide(AUC, 0.5, 0.0, True, ChampionScore("2", 0.9))
    assert decision.promote
    assert decision.forced
    assert decision.reason.startswith("forced")


def test_incomparable_champion_is_kept_unless_forced() -> None:
    champion = ChampionScore("4", None, "feature columns differ: missing ['x']")
    kept = decide(AUC, 0.99, 0.0, False, champion)
    assert not kept.promote
    assert "cannot compare with champion v4: feature columns differ" in kept.reason
    assert "--force" in kept.reason
    assert decide(AUC, 0.99, 0.0, True, champion).forced
