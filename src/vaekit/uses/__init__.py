"""The uses of a trained VAE, one module each: a pure core over tensors, and thin commands that take a run.

generation: samples, reconstructions, latent codes, decodings, interpolations, manifolds.
evaluation: importance-sampled log-likelihood, ELBO, bits/dim, KL per dimension, active units.
"""
