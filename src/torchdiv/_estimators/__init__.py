"""Stochastic trace and diagonal estimators: probes, one module per estimator."""
