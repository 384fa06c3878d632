"""A byte-level tokenizer built in code, so the embedded default needs no download.

Every UTF-8 byte is one token (256 of them) after five special tokens: padding, end of turn (the EOS)
and the three chat roles. It is a ``PreTrainedTokenizerFast`` with a chat template, so ``save_pretrained``
writes it next to the model and ``AutoTokenizer.from_pretrained`` reloads it.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS = "<|pad|>", "<|end|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = (PAD, EOS, *(f"<|{role}|>" for role in ROLES))

# <|user|>question<|end|><|assistant|>answer<|end|>: the answer and its <|end|> are what the model learns.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer(model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """The embedded default's tokenizer: 261 tokens, any text round-trips."""
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # one printable symbol per byte value
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *byte_symbols))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )
