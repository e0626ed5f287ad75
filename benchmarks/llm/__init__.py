"""The causal-LM QAT benchmark (``python -m benchmarks.llm``): a small Llama trained here on the Python
standard library's source, then QAT (STE, PEGE, torchao) at W4/W3/W2 group 32 and W4A8 per-token."""
