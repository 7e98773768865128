"""Compression of a trained model: `decompose` into SVD layers, `prune` (and its distributed
form) singular values, `export` to plain low-rank layers, checkpoints at any rank and the
`summary` of what was saved. The functions are imported from `svdkern` itself."""
