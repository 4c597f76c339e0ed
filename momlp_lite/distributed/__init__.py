"""Run configs and training a MoMLP's experts on many processes (torchrun)."""
