"""The arithmetic task's own tokenizer: a small byte-level BPE trained on the task's text.

Owns: training a byte-level BPE (the ``tokenizers`` library) on the task's text with every
digit kept as its own token (the model copies numbers digit by digit from the tool's
output), the special tokens ``<|im_start|>``, ``<|im_end|>`` (EOS, the end of a turn) and
``<|endoftext|>`` (padding), a ChatML chat template as Qwen's (what
``thor_engine.prompting.render_chat`` renders), and wrapping it all as a
``PreTrainedTokenizerFast`` that transformers and vLLM load from a model directory.
Byte-level pre-tokenisation with the byte-level decoder and no clean-up makes
``decode(encode(x)) == x`` for any text (newlines and backticks included).

Does not own: the text it is trained on (task.py, coldstart.py) or the model (model.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_START",
    "MODEL_MAX_LENGTH",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TOKENIZER_VOCAB_SIZE",
    "train_tokenizer",
]

IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN)
MODEL_MAX_LENGTH = 1024
#: Target vocabulary: 256 bytes + 3 special tokens + merges learned from the task text.
TOKENIZER_VOCAB_SIZE = 640

#: ChatML, as Qwen2.5's template without its tool and default-system branches: every
#: message is ``<|im_start|>{role}\n{content}<|im_end|>\n``; the generation prompt opens
#: the assistant's turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A ``PreTrainedTokenizerFast`` whose BPE merges are learned from *texts* (deterministic
    for the same texts in the same order). *vocab_size* counts the 256 byte tokens and the
    3 special tokens; fewer merges are made when the text has no more pairs to merge."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges: use more than {floor}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )
