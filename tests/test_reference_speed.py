"""benchmarks/reference_speed.py without the reference checkout: paired ratios and the table on made-up timings,
the translation of our default options into MD's cfg, and the refusals (not an MD checkout, unknown method)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import tta

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("reference_speed", ROOT / "benchmarks" / "reference_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _rows(*specs: tuple[str, str | None, str, int]) -> list[dict]:
    return [{"name": n, "method": m, "side": s, "batch": b, "error": None} for n, m, s, b in specs]


def test_paired_median_pairs_rounds(speed) -> None:
    # the medians of the two rows are equal (3.0 each) but, round by round, the first is always 1.5x the second
    ours, md = [3.0, 6.0, 1.5], [2.0, 4.0, 1.0]
    assert speed.paired_median(ours, md) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="same number of rounds"):
        speed.paired_median([1.0], [1.0, 2.0])


def test_summary_and_table(speed) -> None:
    rows = _rows(("plain", None, "plain", 8), ("plain (batch 1)", None, "plain", 1),
                 ("tent (ours)", "tent", "ours", 8), ("tent (MD)", "tent", "reference", 8),
                 ("memo (ours)", "memo", "ours", 1), ("memo (MD)", "memo", "reference", 1),
                 ("sar (ours)", "sar", "ours", 8), ("sar (MD)", "sar", "reference", 8))
    rows[-1]["error"] = "RuntimeError: boom (set-up)"
    times = {"plain": [10.0, 20.0, 10.0], "plain (batch 1)": [1.0, 1.0, 2.0],
             "tent (ours)": [20.0, 40.0, 30.0], "tent (MD)": [25.0, 50.0, 20.0],
             "memo (ours)": [40.0, 40.0, 80.0], "memo (MD)": [20.0, 20.0, 40.0], "sar (ours)": [50.0, 90.0, 60.0]}
    records, comparisons = speed.summarise(rows, times, 8, ["tent", "memo", "sar"])
    by_name = {r["name"]: r for r in records}
    assert by_name["tent (ours)"]["ms_per_batch"] == 30.0
    assert by_name["tent (ours)"]["ratio_to_plain_paired"] == pytest.approx(2.0)  # 2, 2, 3
    assert by_name["memo (ours)"]["ratio_to_plain_paired"] == pytest.approx(40.0)  # against plain at batch 1
    tent, memo, sar = comparisons
    assert tent["ours_over_md"] == pytest.approx(0.8) and tent["met"] is True  # 0.8, 0.8, 1.5
    assert memo["ours_over_md"] == pytest.approx(2.0) and memo["met"] is False
    assert sar["ours_over_md"] is None and sar["met"] is None and "boom" in sar["error"]
    table = speed.format_table({"records": records, "comparisons": comparisons, "notes": ["a note"]})
    assert "plain: 10.00 ms/batch" in table and "plain (batch 1): 1.00 ms/batch" in table
    assert "| tent | 8 | 30.0 (25.0-35.0) | 25.0 (22.5-37.5) | 2.00 | 2.50 | 0.80 (0.80-1.15) | yes |" in table
    assert "| memo | 1 |" in table and "| NO |" in table
    assert "| sar | 8 | 60.0 (55.0-75.0) | failed: RuntimeError: boom (set-up) |" in table
    assert table.endswith("a note")


@pytest.mark.parametrize("name", [m for m in ("tent", "bn_ema", "eta", "eata", "rdumb", "sar", "deyo", "lame",
                                              "roid", "cotta", "rotta", "memo", "t3a")])
def test_defaults_translate_to_md(speed, name: str) -> None:
    """Our defaults are MD's CIFAR-10-C configuration: the cfg built from them holds MD's values."""
    options = tta.method_options(name)()
    speed.check_translatable(name, options)
    cfg = speed.md_cfg(name, options, 200, source_images=400)
    assert cfg.TEST.BATCH_SIZE == 200 and cfg.CORRUPTION.DATASET == "cifar10_c"
    expected = {
        "tent": {"OPTIM": {"METHOD": "Adam", "LR": 1e-3, "BETA": 0.9, "STEPS": 1}},
        "eta": {"EATA": {"FISHER_ALPHA": 0.0, "D_MARGIN": 0.4, "MARGIN_E0": 0.4}},
        "eata": {"EATA": {"FISHER_ALPHA": 1.0, "D_MARGIN": 0.4}, "SOURCE": {"NUM_SAMPLES": 400}},
        "rdumb": {"MODEL": {"RESET_AFTER_NUM_UPDATES": 1000}, "EATA": {"FISHER_ALPHA": 0.0}},
        "sar": {"SAR": {"RESET_CONSTANT_EM": 0.2}, "EATA": {"MARGIN_E0": 0.4}, "OPTIM": {"LR": 1e-3}},
        "deyo": {"DEYO": {"MARGIN": 0.5, "PLPD": 0.2, "AUG_TYPE": "patch", "PATCH_LEN": 4}},
        "lame": {"LAME": {"AFFINITY": "rbf", "KNN": 5, "FORCE_SYMMETRY": False}},
        "roid": {"ROID": {"MOMENTUM_SRC": 0.99, "MOMENTUM_PROBS": 0.9, "USE_CONSISTENCY": True}},
        "cotta": {"COTTA": {"RST": 0.01, "AP": 0.92}, "M_TEACHER": {"MOMENTUM": 0.999},
                  "TEST": {"N_AUGMENTATIONS": 32}},
        "rotta": {"ROTTA": {"MEMORY_SIZE": 64, "UPDATE_FREQUENCY": 64, "NU": 0.001, "ALPHA": 0.05}},
        "memo": {"MODEL": {"EPISODIC": True}, "OPTIM": {"METHOD": "SGD", "LR": 0.005},
                 "BN": {"ALPHA": pytest.approx(0.1)}, "TEST": {"N_AUGMENTATIONS": 32}},
    }.get(name, {})
    for section, values in expected.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, (section, key)


def test_untranslatable_option_is_refused(speed) -> None:
    with pytest.raises(ValueError, match="rho"):
        speed.check_translatable("sar", tta.method_options("sar")(rho=0.1))


def test_refusals(speed, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not an MD checkout"):
        speed.Reference(str(tmp_path), None)
    with pytest.raises(SystemExit, match="unknown method 'nope'"):
        speed.parse_methods("tent,nope", None)
    names, notes = speed.parse_methods("all", None)
    assert "t3a" not in names and "memo" in names and "t3a skipped" in notes[0]
    assert speed.parse_methods("all", "/some/T3A")[0][-1] == "t3a"
