"""Framework front-ends: validation glue and autograd for PyTorch and JAX."""
