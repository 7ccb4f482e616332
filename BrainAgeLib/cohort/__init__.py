"""Many subjects at once: cohort tables and BIDS folders (``tables``), ``brainage batch`` (``batch``,
also sharded under torchrun), the predictions CSV (``predictions_csv``) and metrics with figures (``evaluate``)."""
