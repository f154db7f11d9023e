"""`lmforge serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (lmforge.infer.batched),
with a playground page, Prometheus metrics and the tokenizer endpoints evaluation harnesses use."""
