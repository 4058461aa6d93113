"""Inference: sampling, a KV-cache decoding loop, streaming text and chat, and the
continuous-batching engine behind the server and `largeforge infer`.

    from largeforge.inference import generate
    text = generate("runs/tiny", "Once upon a time", max_new_tokens=50, seed=0)
"""

from largeforge.inference.chat import CHATML_TEMPLATE, ChatSession, resolve_chat_template
from largeforge.inference.engine import ContinuousBatchingEngine
from largeforge.inference.generate import (
    detokenize_stream,
    encode_prompt,
    generate,
    generate_ids,
    load_for_inference,
    stream_text,
    use_decode_layout,
    use_standard_layout,
)
from largeforge.inference.requests import (
    EngineStats,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
    TokenEvent,
)
from largeforge.inference.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    sample_next_token,
)

__all__ = [
    "CHATML_TEMPLATE",
    "ChatSession",
    "ContinuousBatchingEngine",
    "EngineStats",
    "GenerationRequest",
    "QueueFullError",
    "RequestHandle",
    "TokenEvent",
    "SamplingParams",
    "apply_repetition_penalty",
    "detokenize_stream",
    "encode_prompt",
    "filter_top_k",
    "filter_top_p",
    "generate",
    "generate_ids",
    "load_for_inference",
    "resolve_chat_template",
    "sample_next_token",
    "stream_text",
    "use_decode_layout",
    "use_standard_layout",
]
