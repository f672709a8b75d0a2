"""Hot kernels: attention over the paged KV cache."""
