"""The organism's tokenizer and processor: a real sentencepiece model, loaded the Seamless way.

The sentencepiece BPE model is trained on the synthetic corpus with the fairseq special ids
(``unk 0, <s> 1, </s> 2``, no pad), saved as ``sentencepiece.bpe.model``, and loaded with
:class:`SeamlessM4TTokenizer`, which adds the fairseq +1 offset (pad 0, unk 1, <s> 2, </s> 3)
and appends the ``__xxx__`` language tokens after the sentencepiece vocabulary. Constructing
the tokenizer from ``vocab_file=`` silently builds a 4-token vocabulary (docs/platform.md,
"transformers and SeamlessM4T v2"), hence the directory round trip.

The vocabulary is grown until every word of every language is one piece: then each output
token belongs to exactly one language, which is what makes :class:`~crossmodal.steer.lid.OrganismLID`
exact.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm
from transformers import SeamlessM4TFeatureExtractor, SeamlessM4TProcessor, SeamlessM4TTokenizer

from crossmodal.organism.grammar import ORGANISM_LANGUAGES, word_languages

SPM_FILE = "sentencepiece.bpe.model"
_VOCAB_STEP = 100
_MAX_VOCAB = 8000


def language_tokens(languages: Sequence[str] = ORGANISM_LANGUAGES) -> list[str]:
    return [f"__{lang}__" for lang in languages]


def _train_spm(lines: Sequence[str], vocab_size: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        max_sentencepiece_length=32,
        num_threads=1,  # deterministic piece order
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return model.getvalue()


def _split_words(proto: bytes, words: Iterable[str]) -> list[str]:
    sp = spm.SentencePieceProcessor(model_proto=proto)
    return [w for w in words if len(sp.encode(w)) != 1]


def train_sentencepiece(lines: Sequence[str], out_dir: Path) -> Path:
    """Train the BPE model on ``lines``, growing the vocabulary until every word is one piece.

    Raises:
        RuntimeError: if no vocabulary up to 8000 pieces keeps every word whole.
    """
    words = sorted(word_languages())
    lines = [*lines, " ".join(words)]  # every word occurs at least once
    vocab = len({c for w in words for c in w}) + len(words) + 3
    vocab = _VOCAB_STEP * (vocab // _VOCAB_STEP + 1)
    while vocab <= _MAX_VOCAB:
        proto = _train_spm(lines, vocab)
        if not _split_words(proto, words):
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / SPM_FILE
            path.write_bytes(proto)
            return path
        vocab += _VOCAB_STEP
    raise RuntimeError(f"no sentencepiece vocabulary up to {_MAX_VOCAB} keeps every word whole")


def load_tokenizer(model_dir: Path) -> SeamlessM4TTokenizer:
    """The Seamless tokenizer of a directory holding ``sentencepiece.bpe.model``."""
    return SeamlessM4TTokenizer.from_pretrained(
        str(model_dir), additional_special_tokens=language_tokens()
    )


def build_processor(model_dir: Path) -> SeamlessM4TProcessor:
    """Tokenizer (from the directory's sentencepiece model) + the real feature extractor."""
    return SeamlessM4TProcessor(
        feature_extractor=SeamlessM4TFeatureExtractor(), tokenizer=load_tokenizer(model_dir)
    )


def check_single_pieces(tokenizer: SeamlessM4TTokenizer) -> None:
    """Every word must be one token of its own, else LID on tokens is not exact.

    Raises:
        RuntimeError: naming the first word that is split.
    """
    for word in word_languages():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(
                f"word {word!r} tokenizes to {len(ids)} pieces; rebuild the tokenizer"
            )
