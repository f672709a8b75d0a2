"""`inferd serve` for the model kinds beside LLMs and encoders: tensor models (Open Inference Protocol) and
speech (Whisper). Their flags, how a --model spec is recognised as one of them, and how each is loaded."""

from __future__ import annotations

import argparse

from inferd.server.state import Kind, ModelSlot, ServerState


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("tensor models (.onnx, XGBoost .json/.ubj, scikit-learn .skops) and speech")
    g.add_argument("--max-batch-size", type=int, default=64,
                   help="dynamic batching: most rows a tensor model scores in one call (1: batching off)")
    g.add_argument("--max-queue-delay-ms", type=float, default=1.0,
                   help="dynamic batching: how long a started batch waits for more requests (Triton's "
                        "max_queue_delay)")
    g.add_argument("--response-cache-size", type=int, default=0,
                   help="entries in the tensor models' response cache, keyed by a hash of model + inputs (0: off)")
    g.add_argument("--whisper-compute-type", default="int8",
                   help="CTranslate2 compute type for Whisper models (int8, float32, ...)")


def kind_of(spec: str) -> Kind | None:
    """"tensor" or "audio" when the spec names such a model, else None (an LLM or encoder decides)."""
    from inferd.audio.transcriber import is_whisper_spec
    from inferd.tabular.models import is_tensor_model_file

    if is_tensor_model_file(spec):
        return "tensor"
    if is_whisper_spec(spec):
        return "audio"
    return None


def load(slot: ModelSlot, args: argparse.Namespace, state: ServerState) -> None:
    """Load a tensor or speech model into slot.service (raises with the reason on failure)."""
    from inferd.workers.batching import BatchConfig

    state.metrics.add_model(slot.name)
    if slot.kind == "tensor":
        import sys

        from inferd.server.oip import load_tensor_service

        # a batch of a small model takes well under a millisecond: with Python's default 5 ms GIL switch interval
        # the worker thread would wait on the event loop's parsing far longer than it computes
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))

        slot.service = load_tensor_service(slot.spec, slot.name, args.max_batch_size,
                                           args.max_queue_delay_ms / 1000, args.max_queue, args.response_cache_size)
    else:
        from inferd.audio.service import TranscriptionService
        from inferd.audio.transcriber import Transcriber

        slot.service = TranscriptionService(lambda: Transcriber(slot.spec, compute_type=args.whisper_compute_type),
                                            BatchConfig(1, 0.0, args.max_queue))
