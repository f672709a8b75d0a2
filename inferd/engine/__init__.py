"""The engine: requests, KV cache manager, scheduler, runner, sampler and the loops that drive them."""
