"""Data that works offline: scikit-image's bundled photos (:mod:`.images`), super-resolution pairs
(:mod:`.sr`), Gaussian denoising (:mod:`.denoise`) and classification sets (:mod:`.classification`)."""
