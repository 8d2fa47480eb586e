"""The promotion gate's decision, alone: every check and every reason."""

from models.evaluation import METRICS
from models.gate import ChampionScores, HeldOutScores, decide, decide_first

AUC, RMSE = METRICS["roc_auc"], METRICS["rmse"]
MARGIN, TOLERANCE = 0.0, 0.02


def champion(
    new_rows: tuple[float, float, float], trusted_rows: tuple[float, float, float]
) -> ChampionScores:
    """Scores as (new version, champion, dummy baseline) on the new held-out rows and on v3's own."""
    return ChampionScores("3", HeldOutScores(*new_rows), HeldOutScores(*trusted_rows))


def test_first_version_becomes_champion() -> None:
    decision = decide_first(AUC, 0.9, 0.5, force=False)
    assert decision.promote
    assert decision.alias == "champion"
    assert not decision.forced
    assert decision.reason == "first version: no champion yet"


def test_first_version_no_better_than_the_dummy_is_kept_out_unless_forced() -> None:
    decision = decide_first(AUC, 0.5, 0.5, force=False)
    assert not decision.promote
    assert decision.alias == "challenger"
    assert decision.reason == (
        "first version no better than the dummy baseline: roc_auc 0.5000 vs 0.5000; "
        "use --force to promote anyway"
    )
    assert decision.failed == ("baseline_new_rows",)
    assert decide_first(AUC, 0.5, 0.5, force=True).forced


def test_better_on_both_sets_is_promoted_with_every_figure_in_the_reason() -> None:
    decision = decide(AUC, champion((0.95, 0.93, 0.5), (0.99, 0.99, 0.5)), MARGIN, TOLERANCE, False)
    assert decision.promote
    assert not decision.failed
    assert decision.reason == (
        "better: on the new held-out rows roc_auc 0.9500 vs champion v3 0.9300 "
        "(gain +0.0200 > margin 0.0000); "
        "on champion v3's own held-out rows roc_auc 0.9900 vs champion v3 0.9900 "
        "(loss +0.0000 within tolerance 0.0198 = 2% of 0.9900); dummy baseline 0.5000 / 0.5000"
    )


def test_margin_and_ties_on_the_new_rows() -> None:
    trusted = (0.99, 0.99, 0.5)
    assert decide(AUC, champion((0.95, 0.93, 0.5), trusted), 0.01, TOLERANCE, False).promote
    assert not decide(AUC, champion((0.935, 0.93, 0.5), trusted), 0.01, TOLERANCE, False).promote
    tie = decide(AUC, champion((0.93, 0.93, 0.5), trusted), MARGIN, TOLERANCE, False)
    assert not tie.promote
    assert tie.failed == ("champion_new_rows",)
    assert tie.reason.startswith("not better: on the new held-out rows roc_auc 0.9300 vs champion v3 0.9300")
    assert tie.reason.endswith("; use --force to promote anyway")


def test_winning_on_the_new_rows_but_losing_on_the_trusted_ones_is_named_as_such() -> None:
    """The issue's case: both score ~0.6 on the noisy new rows; the champion scored 1.000 on its own."""
    decision = decide(AUC, champion((0.619, 0.613, 0.5), (0.84, 1.0, 0.5)), MARGIN, TOLERANCE, False)
    assert not decision.promote
    assert decision.failed == ("champion_trusted_rows",)
    assert decision.reason == (
        "wins on the new held-out rows roc_auc 0.6190 vs champion v3 0.6130 (gain +0.0060 > margin 0.0000) "
        "but loses on champion v3's own held-out rows roc_auc 0.8400 vs champion v3 1.0000 "
        "(loss +0.1600 beyond tolerance 0.0200 = 2% of 1.0000): label noise or a change of concept: "
        "a person decides with --force"
    )


def test_a_loss_within_the_tolerance_on_the_trusted_rows_is_allowed() -> None:
    assert decide(AUC, champion((0.95, 0.93, 0.5), (0.981, 1.0, 0.5)), MARGIN, TOLERANCE, False).promote
    assert not decide(AUC, champion((0.95, 0.93, 0.5), (0.979, 1.0, 0.5)), MARGIN, TOLERANCE, False).promote
    assert not decide(AUC, champion((0.95, 0.93, 0.5), (0.999, 1.0, 0.5)), MARGIN, 0.0, False).promote


def test_lower_is_better_for_losses_and_the_tolerance_is_a_share_of_the_champions_score() -> None:
    assert decide(RMSE, champion((9.0, 10.0, 30.0), (10.1, 10.0, 30.0)), MARGIN, TOLERANCE, False).promote
    assert not decide(
        RMSE, champion((11.0, 10.0, 30.0), (10.0, 10.0, 30.0)), MARGIN, TOLERANCE, False
    ).promote
    lost = decide(RMSE, champion((9.0, 10.0, 30.0), (10.3, 10.0, 30.0)), MARGIN, TOLERANCE, False)
    assert lost.failed == ("champion_trusted_rows",)
    assert "(loss +0.3000 beyond tolerance 0.2000 = 2% of 10.0000)" in lost.reason


def test_a_version_no_better_than_the_dummy_on_the_new_rows_is_refused() -> None:
    # Beats a weak champion, but a constant does as well: nothing was learnt from the new data.
    decision = decide(AUC, champion((0.5, 0.45, 0.5), (0.99, 0.99, 0.5)), MARGIN, TOLERANCE, False)
    assert not decision.promote
    assert decision.failed == ("baseline_new_rows",)
    assert decision.reason == (
        "not better: no better than the dummy baseline on the new held-out rows: roc_auc 0.5000 vs 0.5000; "
        "use --force to promote anyway"
    )


def test_a_version_no_better_than_the_dummy_on_the_trusted_rows_is_refused() -> None:
    decision = decide(RMSE, champion((9.0, 10.0, 30.0), (30.5, 31.0, 30.0)), MARGIN, TOLERANCE, False)
    assert not decision.promote
    assert decision.failed == ("baseline_trusted_rows",)
    assert (
        "no better than the dummy baseline on champion v3's own held-out rows: rmse 30.5000 vs 30.0000"
        in (decision.reason)
    )


def test_every_failed_check_is_named() -> None:
    decision = decide(AUC, champion((0.48, 0.9, 0.5), (0.49, 0.99, 0.5)), MARGIN, TOLERANCE, False)
    assert decision.failed == (
        "baseline_new_rows",
        "baseline_trusted_rows",
        "champion_new_rows",
        "champion_trusted_rows",
    )
    assert decision.reason.startswith("not better: ")
    assert decision.reason.count(";") == 4


def test_force_promotes_and_says_why_it_was_needed() -> None:
    decision = decide(AUC, champion((0.619, 0.613, 0.5), (0.84, 1.0, 0.5)), MARGIN, TOLERANCE, True)
    assert decision.promote
    assert decision.forced
    assert decision.alias == "champion"
    assert decision.reason.startswith("forced; wins on the new held-out rows")
    assert decision.failed == ("champion_trusted_rows",)


def test_incomparable_champion_is_kept_unless_forced() -> None:
    incomparable = ChampionScores("4", incomparable="feature columns differ: missing ['x']")
    kept = decide(AUC, incomparable, MARGIN, TOLERANCE, False)
    assert not kept.promote
    assert kept.reason == (
        "cannot compare with champion v4: feature columns differ: missing ['x']; "
        "use --force to promote anyway"
    )
    assert kept.failed == ("comparable",)
    assert decide(AUC, incomparable, MARGIN, TOLERANCE, True).forced


def test_figures_are_flat_for_mlflow_metrics() -> None:
    assert champion((0.95, 0.93, 0.5), (0.99, 0.98, 0.4)).figures() == {
        "new_rows_new": 0.95,
        "new_rows_champion": 0.93,
        "new_rows_baseline": 0.5,
        "trusted_rows_new": 0.99,
        "trusted_rows_champion": 0.98,
        "trusted_rows_baseline": 0.4,
    }
