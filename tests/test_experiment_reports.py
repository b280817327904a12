"""The experiments' result pages: spreads over seeds and verdicts decided seed by seed."""

import pytest
from core_helpers import load_experiment as experiment


def blending_runs(ea, random, l1, apoz, equal):
    """One seed's runs; each argument is (test before, test after fine-tuning)."""

    def run(before, after):
        return {
            "fitness_accuracy": before + 0.01,
            "held_out_validation": before,
            "test": before,
            "test_finetuned": after,
            "flops_left": 0.258,
        }

    return {
        "runs": {
            "blend (EA)": run(*ea),
            "blend (random search)": run(*random),
            "l1": run(*l1),
            "apoz": run(*apoz),
            "blend (equal factors)": run(*equal),
        },
        "searches": {},
        "wall_s": 60.0,
    }


def test_the_blending_page_gives_spreads_and_per_seed_verdicts():
    blending = experiment("blending_vgg_small")
    stored = {
        "settings": {"finetune_examples": 0},
        "base_test_accuracy": 0.9231,
        "seeds": {
            "0": blending_runs((0.50, 0.90), (0.45, 0.905), (0.10, 0.89), (0.40, 0.88), (0.3, 0.8)),
            "1": blending_runs((0.52, 0.91), (0.40, 0.90), (0.10, 0.92), (0.40, 0.87), (0.3, 0.8)),
        },
    }
    page = blending.results_markdown(stored)
    assert "mean ± standard deviation over 2 seeds (0, 1)" in page
    assert "one epoch over 55000 training images" in page
    # blend (EA): test before 50 and 52 -> 51.00 ± 1.41; fine-tuned 90 and 91 -> 90.50 ± 0.71.
    assert "| blend (EA) | 52.00 ± 1.41 | 51.00 ± 1.41 | 51.00 ± 1.41 | 90.50 ± 0.71 |" in page
    # The single criteria read fixed images: no spread before fine-tuning.
    assert "| apoz | 41.00 ± 0.00 | 40.00 ± 0.00 | 40.00 ± 0.00 | 87.50 ± 0.71 |" in page
    # Before fine-tuning the blend beats the best single (apoz, 40) in both seeds...
    assert "blend minus best single per seed: +10.00 (apoz), +12.00 (apoz) | holds (2/2" in page
    # ...after it, l1 wins seed 1 (92 > 91).
    assert "+1.00 (l1), -1.00 (l1) | mixed (1/2 seeds)" in page
    # The random-search control: EA minus random after fine-tuning is -0.5 and +1.0.
    assert "EA minus random per seed: -0.50, +1.00 | mixed (1/2 seeds)" in page
    mean, deviation, count = blending.spread(stored, "l1", "test_finetuned")
    assert (mean, count) == (pytest.approx(90.5), 2) and deviation == pytest.approx(2.1213, 1e-3)


def iterative_run(accuracies, final_test):
    """A run whose validation accuracy is `accuracies[i]` at 50 - 5 i MFLOPs."""
    history = [
        {"flops": (50 - 5 * i) * 1e6, "validation": {"accuracy": a / 100}}
        for i, a in enumerate(accuracies)
    ]
    cost = {"before": {"flops": 60e6}, "after": {"flops": history[-1]["flops"]}}
    return {"history": history, "summary": {"cost": cost}, "test": {"accuracy": final_test}}


def test_the_iterative_page_compares_at_equal_flops_seed_by_seed():
    iterative = experiment("iterative_vgg_small")
    stored = {
        "runs": {
            "taylor/0": iterative_run([91, 90, 89, 88, 87, 86], 0.85),
            "random/0": iterative_run([90, 88, 86, 84, 82, 80], 0.75),
            "taylor/1": iterative_run([91, 90, 89, 88, 87, 86], 0.86),
            "random/1": iterative_run([92, 91, 90, 89, 88, 87], 0.80),
        }
    }
    # Interpolated between steps: 42.5 MFLOPs lies between 45 (90) and 40 (89) for taylor.
    assert iterative.at_mflops(stored["runs"]["taylor/0"], 42.5) == pytest.approx(89.5)
    assert iterative.at_mflops(stored["runs"]["taylor/0"], 20) is None  # never reached
    page = iterative.results_markdown(stored)
    assert "| taylor | 90.00 ± 0.00 | 89.00 ± 0.00 | 88.00 ± 0.00 | 87.00 ± 0.00 | 86.00" in page
    # Seed 0: taylor is 2..6 points above random at 45..25 M (mean 4); seed 1: 1 point below.
    assert "(+4.00, -1.00) | mixed (1/2 seeds) |" in page
    assert "| 25.00 ± 0.00 | 85.50 ± 0.71 |" in page  # final MFLOPs and test accuracy
