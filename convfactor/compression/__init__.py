"""Layer 3, compression: rules, module surgery, :func:`factorize` / :func:`compress`, inspect,
calibration capture and exact merging of adjacent linear layers (:mod:`.merge`)."""
