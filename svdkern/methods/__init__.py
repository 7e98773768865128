"""The training methods: SVD training (`svd_training`, the paper's) and TRP (`trp`)."""
