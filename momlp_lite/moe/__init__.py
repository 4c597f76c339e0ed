"""Mixtures of MLP experts: routing trees, stacked experts, Algorithm 2 training."""
