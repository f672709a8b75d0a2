"""Workers that run models off the event loop: the dynamic batcher shared by every non-LLM model kind."""
