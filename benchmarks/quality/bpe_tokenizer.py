"""A byte-level BPE tokenizer trained locally with the ``tokenizers`` package, saved in Hugging
Face format (``tokenizer.json`` + ``tokenizer_config.json``) so transformers and SGLang load it.

Digits are split one per token (passkeys are then copied digit by digit); ``<s>`` is added at the
start of every encoded text when special tokens are requested, as Llama tokenizers do.
"""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK, BOS, EOS, PAD = SPECIAL_TOKENS


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """-> ``tokenizers.Tokenizer`` with ids 0..3 = <unk>, <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def to_hf(tokenizer):
    """Wrap a trained ``tokenizers.Tokenizer`` as ``PreTrainedTokenizerFast`` (what ``save_pretrained``
    writes and ``AutoTokenizer.from_pretrained`` reads back)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, clean_up_tokenization_spaces=False)


class FastEncoder:
    """Plain ``text -> ids`` without special tokens, and batch encoding on all cores."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # tokenizers.Tokenizer
        self.bos_id = tokenizer.token_to_id(BOS)
        self.eos_id = tokenizer.token_to_id(EOS)
        self.vocab_size = tokenizer.get_vocab_size()

    def __call__(self, text: str):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    @classmethod
    def from_dir(cls, model_dir: str) -> "FastEncoder":
        from tokenizers import Tokenizer
        import os

        return cls(Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json")))
