"""How fast and how large: one prediction stage by stage (``single``), volumes per minute over a
cohort (``cohort``) and ``prepare`` step by step (``profile_prepare``)."""
