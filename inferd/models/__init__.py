"""Model architectures: plain torch modules over flat token batches and a paged KV cache."""
