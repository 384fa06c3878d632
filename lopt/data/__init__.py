"""Training data: the conversation formats, tokenisation and batching (``sft``) and the embedded
default task (``embedded``)."""
