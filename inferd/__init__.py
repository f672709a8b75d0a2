"""inferd: a fast AI inference engine and OpenAI-compatible server on PyTorch."""

from inferd.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "Embedder", "SamplingParams", "__version__"]


def __getattr__(name: str):  # keep `import inferd` light: torch loads on first use
    if name == "LLM":
        from inferd.llm import LLM

        return LLM
    if name == "Embedder":
        from inferd.embedder import Embedder

        return Embedder
    raise AttributeError(name)
