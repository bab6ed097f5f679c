"""Probes and experiments behind decisions in the library; README.md here says what each one asks."""
