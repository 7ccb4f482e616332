"""Why the model gave its age: the attention map (``methods``), its labelmap (``labelmap``), the
files and pictures a prediction writes (``outputs``, ``qc_figure``, ``slice_views``) and
attention maps averaged over a cohort in template space (``cohort_maps``)."""
