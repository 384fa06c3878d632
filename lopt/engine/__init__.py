"""The LoPT method on a Hugging Face causal LM: the model with its boundaries and decoders
(``LoPTModel``) and ``lopt.apply`` for other trainers. No files, ranks or argparse here."""
