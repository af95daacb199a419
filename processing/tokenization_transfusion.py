"""Training a small tokenizer offline, for models trained from scratch on a caption corpus."""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .processing_transfusion import add_image_tokens


def train_caption_tokenizer(
    corpus: Iterable[str], vocab_size: int = 400, with_image_tokens: bool = True
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on `corpus` in about a second, with no download.

    The tokenizer prepends `<s>` (like Llama), ends with `</s>` and pads with `<pad>` (ids 1, 2, 0); with
    `with_image_tokens`, it also holds `<boi>`, `<image>`, `<eoi>` as special tokens, after the trained vocabulary
    (at most `vocab_size` entries; fewer when the corpus is small). Byte-level, so any text can be encoded, even
    text outside the corpus.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if with_image_tokens:
        add_image_tokens(fast)
    return fast


__all__ = ["train_caption_tokenizer"]
