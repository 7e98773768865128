"""SVD training inside the trainers people use: `svdkern.integrations.transformers` (Hugging
Face `Trainer`) and `svdkern.integrations.lightning` (Lightning `Trainer`), each a callback
over `svdkern.SVDTraining`. Each module imports its framework (extras `svdkern[transformers]`,
`svdkern[lightning]`); `import svdkern` imports neither."""
