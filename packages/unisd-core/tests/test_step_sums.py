"""StepSums: a component's per-step counters start again at zero when a new optimiser step begins."""

from unisd.divergence.stepstats import StepSums


def test_sums_accumulate_over_micro_batches_and_reset_on_a_new_step():
    sums = StepSums()
    assert not sums.started and sums["tokens"] == 0.0
    sums.add(1, tokens=3, clipped=1)
    sums.add(1, tokens=2)  # a second micro-batch of step 1
    assert sums.started and (sums["tokens"], sums["clipped"]) == (5.0, 1.0)
    sums.add(2, tokens=4)  # step 2 starts from zero: step 1's clipped count does not carry over
    assert (sums["tokens"], sums["clipped"], sums.step) == (4.0, 0.0, 2)
    sums.add(2)  # no amounts: a reset point only, nothing changes within the step
    assert sums["tokens"] == 4.0
