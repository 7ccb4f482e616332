import numpy as np
import pytest

from BrainAgeLib.bias_correction import BiasCorrection


def test_fit_recovers_known_regression_to_the_mean():
    rng = np.random.default_rng(0)
    age = rng.uniform(20, 90, 500)
    # A model that shrinks toward 55 years: predicted = 55 + 0.7 (age - 55) + noise.
    predicted = 55 + 0.7 * (age - 55) + rng.normal(0, 1.0, age.size)
    fit = BiasCorrection.fit(age, predicted)
    assert fit.slope == pytest.approx(-0.3, abs=0.02)
    assert fit.intercept == pytest.approx(0.3 * 55, abs=1.0)
    corrected = fit.corrected_gap(predicted, age)
    raw_r = np.corrcoef(age, predicted - age)[0, 1]
    corrected_r = np.corrcoef(age, corrected)[0, 1]
    assert raw_r < -0.9 and abs(corrected_r) < 0.05


def test_scalar_and_round_trip():
    fit = BiasCorrection(slope=-0.2, intercept=10.0, n_reference=30)
    # BAG 5 at age 50 minus the expected gap (-0.2*50 + 10 = 0) stays 5.
    assert fit.corrected_gap(55.0, 50.0) == pytest.approx(5.0)
    assert fit.corrected_gap(75.0, 70.0) == pytest.approx(5.0 - (-4.0))
    assert BiasCorrection.from_dict(fit.to_dict()) == fit


def test_fit_needs_two_distinct_ages():
    with pytest.raises(ValueError, match="two reference subjects"):
        BiasCorrection.fit([50, 50, 50], [51, 52, 53])
