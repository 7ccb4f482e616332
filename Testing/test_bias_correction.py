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


def test_a_reference_fit_is_refused_below_the_minimum_subjects_and_age_span():
    from BrainAgeLib.bias_correction import (MIN_REFERENCE_AGE_RANGE_YEARS, MIN_REFERENCE_SUBJECTS,
                                             BiasCorrectionRefused)

    n, span = MIN_REFERENCE_SUBJECTS, MIN_REFERENCE_AGE_RANGE_YEARS
    age = np.linspace(40.0, 40.0 + span, n)
    predicted = 50 + 0.6 * (age - 50)
    fit = BiasCorrection.fit_on_reference(age, predicted)
    assert fit == BiasCorrection.fit(age, predicted) and fit.n_reference == n
    with pytest.raises(BiasCorrectionRefused, match=f"{n - 1} reference subjects.*at least {n}"):
        BiasCorrection.fit_on_reference(age[:-1], predicted[:-1])
    squeezed = np.linspace(40.0, 40.0 + 0.9 * span, n)
    with pytest.raises(BiasCorrectionRefused, match=f"span {0.9 * span:.1f} years.*at least {span:g}"):
        BiasCorrection.fit_on_reference(squeezed, predicted)
    # non-finite pairs do not count as subjects
    holes = predicted.copy()
    holes[0] = np.nan
    with pytest.raises(BiasCorrectionRefused, match=f"{n - 1} reference subjects"):
        BiasCorrection.fit_on_reference(age, holes)
