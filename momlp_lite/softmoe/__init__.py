"""Soft MoE (Puigcerver et al. 2023) and best-expert-subset selection (Chung et al. 2025)."""
