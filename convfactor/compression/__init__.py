"""Layer 3, compression: rules, module surgery, :func:`factorize` / :func:`compress`, inspect and
calibration capture."""
