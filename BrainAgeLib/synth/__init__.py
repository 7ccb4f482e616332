"""Synthetic T1 heads with a known age: lifespan curves of tissue volumes (``lifespan``) and the
phantoms and cohorts made from the MNI template (``phantoms``)."""
