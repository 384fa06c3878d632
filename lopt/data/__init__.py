"""Training data: the conversation formats, tokenisation and batching (``sft``), the embedded default
task (``embedded``), the classification format ZO scores (``classification``) and its embedded
sentiment task (``sentiment``, generated from the VADER lexicon shipped beside it)."""
