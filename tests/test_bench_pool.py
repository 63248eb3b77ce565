"""bench/pool_mitigate.py: pooling raw lines of several invocations, complete valid settings only."""

from __future__ import annotations

import json

import pytest

from bench.pool_mitigate import main, pool


def _line(cls, seed, method, wg, valid=True, feature=None):
    line = {"bench": "mitigate", "family": "quadrants", "spurious_class": cls, "cramers_v": 0.99, "seed": seed}
    line |= {"method": method, "valid": valid, "image_overall": 0.9, "image_worst_group": wg}
    line |= {"region_overall": 0.8, "region_worst_group": wg / 2, "flip_rate": 0.1}
    return line | ({"feature": feature} if feature else {})


def _setting(cls, seed, valid=True, feature=None):
    line = {"bench": "mitigate-setting", "family": "quadrants", "spurious_class": cls, "cramers_v": 0.99}
    line |= {"seed": seed, "valid": valid}
    return line | ({"feature": feature} if feature else {})


def test_pooling_keeps_complete_valid_settings_and_pairs_them(tmp_path, capsys):
    first = [_setting(3, 0), _line(3, 0, "standard", 0.5), _line(3, 0, "ravl", 0.7)]
    first += [_setting(5, 0, valid=False), _line(5, 0, "standard", 0.1, valid=False)]
    second = [_setting(3, 1), _line(3, 1, "standard", 0.6), _line(3, 1, "ravl", 0.9)]
    second += [_setting(8, 1), _line(8, 1, "standard", 0.2)]  # stopped before ravl: left out
    # the same class and seed with another feature is another setting
    second += [_setting(3, 0, feature="blue disk"), _line(3, 0, "standard", 0.4, feature="blue disk")]
    second += [_line(3, 0, "ravl", 0.4, feature="blue disk")]
    paths = []
    for name, lines in (("a", first), ("b", second)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        paths.append(str(path))
    methods, settings, counts = pool(paths)
    assert methods == ["standard", "ravl"]
    assert counts == {"settings": 5, "valid": 4, "pairs": 3}
    main(paths)
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    summary = {x["method"]: x for x in out if x["bench"] == "mitigate-summary"}
    assert summary["ravl"]["image_worst_group"] == pytest.approx((0.7 + 0.9 + 0.4) / 3)
    paired = next(x for x in out if x["bench"] == "mitigate-paired" and x["metric"] == "image_worst_group")
    assert paired["n"] == 3 and paired["mean"] == pytest.approx((0.2 + 0.3 + 0.0) / 3)
    assert paired["better_in"] == 2 and paired["ci95"][0] < paired["mean"] < paired["ci95"][1]
    main([*paths, "--markdown"])
    table = capsys.readouterr().out
    assert "3 paired settings (4 valid of 5)" in table
    assert "| RaVL, the paper's loss | 90.0 ± 0.0 | 66.7 ± 25.2 |" in table


def test_a_second_ravl_arm_is_paired_with_the_baselines_and_the_first(tmp_path, capsys):
    lines = []
    for seed, (std, ravl, masked) in enumerate(((0.5, 0.6, 0.9), (0.4, 0.6, 0.7))):
        lines += [_setting(3, seed), _line(3, seed, "standard", std), _line(3, seed, "ravl", ravl)]
        lines += [_line(3, seed, "ravl+masked", masked)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    # the setting of seed 0 audited again by a second invocation: it counts once
    again = tmp_path / "b.jsonl"
    again.write_text(json.dumps(_setting(3, 0)) + "\n")
    assert pool([str(path), str(again)])[2] == {"settings": 2, "valid": 2, "pairs": 2}
    main([str(path)])
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    paired = {
        (x["arm"], x["minus"]): x for x in out if x["bench"] == "mitigate-paired" and x["metric"] == "image_worst_group"
    }
    assert set(paired) == {("ravl", "standard"), ("ravl+masked", "standard"), ("ravl+masked", "ravl")}
    assert paired["ravl+masked", "ravl"]["mean"] == pytest.approx(0.2) and paired["ravl+masked", "ravl"]["n"] == 2
    main([str(path), "--markdown"])
    assert "| RaVL + masked image term | 90.0 ± 0.0 | 80.0 ± 14.1 |" in capsys.readouterr().out
    # a third seed without the masked arm: it pairs only when the pool is restricted to the arms it ran
    third = tmp_path / "c.jsonl"
    third.write_text(
        "".join(json.dumps(x) + "\n" for x in (_setting(3, 2), *(_line(3, 2, m, 0.3) for m in ("standard", "ravl"))))
    )
    assert pool([str(path), str(third)])[2]["pairs"] == 2
    methods, settings, counts = pool([str(path), str(third)], ["ravl", "standard"])
    assert (
        methods == ["ravl", "standard"]
        and counts["pairs"] == 3
        and all(set(v) == {"ravl", "standard"} for v in settings.values())
    )
    with pytest.raises(SystemExit, match="no valid run of vl-erm"):
        pool([str(path)], ["standard", "vl-erm"])
