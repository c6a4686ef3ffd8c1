"""Population-based tuning (PBT/PB2) across the cluster with Ray Tune, advisor-guided explore.

Lands with the tuning issue; the package exists now so the distribution's layout is fixed.
"""
