"""Build a word-level tokenizer from a corpus, as a standard transformers fast tokenizer.

Words and punctuation runs are tokens (the `tokenizers` Whitespace pre-tokenizer, regex
`\\w+|[^\\w\\s]+`), case preserved, so every entity name of the demo world is one token and a
leading space does not change a word's id: "X was born in" + " Y" encodes Y exactly as the
corpus does (see trackstar_db.featurizer.tokenize.encode_query). Words absent from the corpus map to <unk>.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}


def build_tokenizer(texts: Iterable[str], out_dir: str | Path | None = None, min_frequency: int = 1,
                    model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on `texts`; ids 0..3 are <pad>, <unk>, <bos>, <eos>.

    With `out_dir`, the tokenizer is also saved there (save_pretrained), so
    models/load.open_tokenizer(out_dir) reloads it offline.
    """
    core = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no prefix in use
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIALS.values()), min_frequency=min_frequency)
    core.train_from_iterator(texts, trainer=trainer)
    if core.get_vocab_size() <= len(SPECIALS):
        raise ValueError("build_tokenizer: the texts hold no words")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, model_max_length=model_max_length, **SPECIALS)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
