"""The benchmark's verdicts (tests/bench/harness.py): met / missed by the medians, "within
noise" when atomnet's min–max range overlaps the goal's range (goal × the baseline's
min–max), and how the report prints each."""
from __future__ import annotations

from tests.bench.harness import MET, MISSED, NOISE, Row, Sample, Series, Target, overlaps
from tests.bench.report import verdict_cells


def series(name: str, *values: float) -> Series:
    return Series(name, [Sample(v) for v in values])


def row(ours: tuple[float, ...], theirs: tuple[float, ...], target: Target, better: str = "higher") -> Row:
    return Row("case", "metric", "Gbit/s", series("atomnet", *ours), series("base", *theirs), [target], better=better)


def test_overlaps_includes_touching_ends():
    assert overlaps((1, 2), (2, 3)) and overlaps((2, 3), (1, 2)) and overlaps((1, 4), (2, 3))
    assert not overlaps((1, 2), (2.01, 3)) and not overlaps((3, 4), (1, 2.99))


def test_clear_win_is_met_and_clear_loss_is_missed():
    ge = Target(">=", 1.0, text="≥ 1.0×")
    [(_, v, x)] = row((12.0, 12.5, 13.0), (10.0, 10.5, 11.0), ge).verdicts()
    assert v == MET and abs(x - 12.5 / 10.5) < 1e-9
    [(_, v, _)] = row((8.0, 8.5, 9.0), (10.0, 10.5, 11.0), ge).verdicts()
    assert v == MISSED


def test_overlapping_ranges_are_within_noise_whichever_way_the_medians_lean():
    ge = Target(">=", 1.0)
    # median ratio 0.99 (would be "missed") and 1.01 (would be "met"): both undecidable
    assert row((14.5, 14.8, 15.3), (14.5, 15.0, 15.4), ge).verdicts()[0][1] == NOISE
    assert row((14.6, 15.1, 15.3), (14.5, 15.0, 15.4), ge).verdicts()[0][1] == NOISE


def test_goal_ratio_scales_the_baseline_range():
    # goal 0.95×: the goal range is 0.95 × [100, 110] = [95, 104.5]
    t = Target(">=", 0.95)
    assert row((90, 92, 94.9), (100, 105, 110), t).verdicts()[0][1] == MISSED
    assert row((94, 97, 99), (100, 105, 110), t).verdicts()[0][1] == NOISE
    assert row((104.6, 105, 106), (100, 105, 110), t).verdicts()[0][1] == MET   # overlaps the baseline, not the goal


def test_lower_is_better_targets():
    # latency: goal ≤ 0.9× → the goal range is 0.9 × [3.18, 3.35] = [2.862, 3.015]
    le = Target("<=", 0.9)
    assert row((2.99, 3.01, 3.16), (3.18, 3.24, 3.35), le, "lower").verdicts()[0][1] == NOISE
    assert row((2.5, 2.6, 2.8), (3.18, 3.24, 3.35), le, "lower").verdicts()[0][1] == MET
    assert row((3.05, 3.1, 3.2), (3.18, 3.24, 3.35), le, "lower").verdicts()[0][1] == MISSED


def test_absolute_targets_are_never_noise():
    t = Target("<=", 2.0, absolute=True)
    r = Row("cp", "time", "s", series("atomnet", 1.5, 1.9, 2.5), None, [t], better="lower")
    assert r.verdicts()[0][1] == MET
    r = Row("cp", "time", "s", series("atomnet", 1.9, 2.1, 2.5), None, [t], better="lower")
    assert r.verdicts()[0][1] == MISSED


def test_single_runs_and_missing_data():
    ge = Target(">=", 1.0)
    assert row((10.0,), (10.0,), ge).verdicts()[0][1] == NOISE    # equal points overlap
    assert row((10.1,), (10.0,), ge).verdicts()[0][1] == MET
    r = Row("case", "metric", "Gbit/s", Series("atomnet", [Sample(0.0, flagged="tool failed")]), series("b", 1.0), [ge])
    assert r.verdicts()[0][1] is None


def test_report_cells_and_json():
    r = row((14.5, 14.8, 15.3), (14.5, 15.0, 15.4), Target(">=", 1.0, text="≥ 1.0× routed veth"))
    assert verdict_cells(r) == ("≥ 1.0× routed veth", "within noise (0.99×)")
    assert verdict_cells(row((8.0,), (10.0,), Target(">=", 1.0, text="t")))[1] == "**missed** (0.80×)"
    assert verdict_cells(row((12.0,), (10.0,), Target(">=", 1.0, text="t")))[1] == "met (1.20×)"
    [t] = r.to_dict()["targets"]
    assert t["verdict"] == NOISE and t["met"] is False
