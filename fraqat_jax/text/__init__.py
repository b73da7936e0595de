"""text/: the text family (language models: Gemma-2), token windows, forward-KL distillation,
greedy text samples and LLM-QAT's data-free sequences, behind the family interface.

``loss``: the distillation losses over next-token distributions (``kl``, ``mse``). ``generate``:
greedy continuations and data-free sequences with a fixed-shape buffer. ``samples``: the text
sample files a run writes at each change of bit-width.
"""
