"""A processor with SeamlessM4T v2 large's vocabulary size and language-tag ids, built offline.

Random-weight models with the real shapes need a tokenizer whose ids span the real
256,102-token text vocabulary and whose ``__xxx__`` language tags sit where
``facebook/seamless-m4t-v2-large`` puts them, so that memory, logits, argmax and decoding
see the real sizes. The real tokenizer cannot be downloaded everywhere, so this module
builds a stand-in deterministically and caches it:

- a sentencepiece BPE model trained on the organism's generated corpus (every language's
  text; the organism tokenizer's training, so every organism word is one piece), padded
  with filler pieces to exactly :data:`SPM_PIECES` (256,000) pieces, as the real
  ``sentencepiece.bpe.model``. Filler pieces are two characters of the Unicode private
  use area, which no corpus text contains, so they never change how text is split; they
  only make the id space real. :class:`SeamlessM4TTokenizer` adds the fairseq offset
  (pad 0, unk 1, <s> 2, </s> 3; pieces at 4..256,000);
- the 98 text-output language tags of SeamlessM4T v2 (96 languages, ``cmn_Hant`` and
  ``zlm`` included) as added tokens ``__xxx__`` in alphabetical order, which puts them at
  256,001..256,098: the model's ``text_decoder_lang_to_code_id`` (``eng`` 256,022, ``deu``
  256,020, ``spa`` 256,081): the table and order of transformers' conversion script for
  this checkpoint, whose tokenizer adds the tags in this order after the sentencepiece
  vocabulary and whose ``text_decoder_lang_to_code_id`` is read from that tokenizer (four
  ids also checked against the real checkpoint's output: docs/benchmarks.md, "The
  real-vocabulary processor"). The model's last three ids
  (256,099..256,101) have no token: the embedding table is larger than the tokenizer, as the
  config's vocabulary size says;
- the real feature extractor with its defaults.

Building takes about half a minute; the directory (``processor_dir``) is written once and
loaded from then on (``tokenizer.json`` makes later loads fast).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import SeamlessM4TFeatureExtractor, SeamlessM4TProcessor, SeamlessM4TTokenizer

if TYPE_CHECKING:  # sentencepiece is needed to build, not to read the ids (GPU benchmark)
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

SPM_FILE = "sentencepiece.bpe.model"
SPM_PIECES = 256_000
"""Pieces of the real ``sentencepiece.bpe.model`` (ids 1..256,000 after the fairseq offset)."""
LANGUAGE_TAG_START = 256_001
VOCAB_SIZE = 256_102
"""``SeamlessM4Tv2Config().vocab_size``: the text vocabulary of the real model."""
SEAMLESS_TEXT_LANGUAGES = [
    "afr",
    "amh",
    "arb",
    "ary",
    "arz",
    "asm",
    "azj",
    "bel",
    "ben",
    "bos",
    "bul",
    "cat",
    "ceb",
    "ces",
    "ckb",
    "cmn",
    "cmn_Hant",
    "cym",
    "dan",
    "deu",
    "ell",
    "eng",
    "est",
    "eus",
    "fin",
    "fra",
    "fuv",
    "gaz",
    "gle",
    "glg",
    "guj",
    "heb",
    "hin",
    "hrv",
    "hun",
    "hye",
    "ibo",
    "ind",
    "isl",
    "ita",
    "jav",
    "jpn",
    "kan",
    "kat",
    "kaz",
    "khk",
    "khm",
    "kir",
    "kor",
    "lao",
    "lit",
    "lug",
    "luo",
    "lvs",
    "mai",
    "mal",
    "mar",
    "mkd",
    "mlt",
    "mni",
    "mya",
    "nld",
    "nno",
    "nob",
    "npi",
    "nya",
    "ory",
    "pan",
    "pbt",
    "pes",
    "pol",
    "por",
    "ron",
    "rus",
    "sat",
    "slk",
    "slv",
    "sna",
    "snd",
    "som",
    "spa",
    "srp",
    "swe",
    "swh",
    "tam",
    "tel",
    "tgk",
    "tgl",
    "tha",
    "tur",
    "ukr",
    "urd",
    "uzn",
    "vie",
    "yor",
    "yue",
    "zlm",
    "zul",
]
"""The 98 language tags SeamlessM4T v2 writes text with, in the order of their ids."""
_FORMAT = 2  # bump when the built directory changes; a stale cache is rebuilt
_STAMP = "real_vocab_processor.json"
_PRIVATE_USE = 0xE000
_PRIVATE_USE_SIZE = 6400  # U+E000..U+F8FF


def language_ids() -> dict[str, int]:
    """Language code -> decoder language-tag id, as in the real model's generation config."""
    return {lang: LANGUAGE_TAG_START + i for i, lang in enumerate(SEAMLESS_TEXT_LANGUAGES)}


def default_cache_dir() -> Path:
    """``$CROSSMODAL_CACHE`` or ``~/.cache/crossmodal``."""
    return Path(os.environ.get("CROSSMODAL_CACHE", "~/.cache/crossmodal")).expanduser()


def _corpus_lines() -> list[str]:
    """The organism's text in every language: a generated corpus, the same on every run."""
    from crossmodal.organism import organism_corpus

    records = organism_corpus("train", n_sentences=300, audio=False)
    return [r.text for r in records]


def _train(lines: list[str]) -> spm_pb2.ModelProto:
    """The organism's BPE training (every organism word one piece), as a proto to extend."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    from crossmodal.organism.tokenizer import train_sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        proto = spm_pb2.ModelProto()
        proto.ParseFromString(train_sentencepiece(lines, Path(tmp)).read_bytes())
    return proto


def _pad_to_real_size(proto: spm_pb2.ModelProto) -> None:
    """Append private-use filler pieces (scored below every trained piece) to 256,000."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    floor = min(p.score for p in proto.pieces) - 1.0
    for i in range(SPM_PIECES - len(proto.pieces)):
        high, low = divmod(i, _PRIVATE_USE_SIZE)
        piece = proto.pieces.add()
        piece.piece = "\u2581" + chr(_PRIVATE_USE + high) + chr(_PRIVATE_USE + low)
        piece.score = floor - i * 1e-6
        piece.type = spm_pb2.ModelProto.SentencePiece.NORMAL


def sentencepiece_model() -> bytes:
    """The serialized 256,000-piece BPE model (deterministic)."""
    proto = _train(_corpus_lines())
    _pad_to_real_size(proto)
    return proto.SerializeToString()


def _write(out_dir: Path) -> None:
    """Build into a temporary sibling, then rename: a crash never leaves half a directory."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / SPM_FILE).write_bytes(sentencepiece_model())
        tokenizer = SeamlessM4TTokenizer.from_pretrained(
            str(tmp), additional_special_tokens=[f"__{x}__" for x in SEAMLESS_TEXT_LANGUAGES]
        )
        processor = SeamlessM4TProcessor(
            feature_extractor=SeamlessM4TFeatureExtractor(), tokenizer=tokenizer
        )
        processor.save_pretrained(str(tmp))
        (tmp / _STAMP).write_text(json.dumps({"format": _FORMAT, "vocab_size": VOCAB_SIZE}))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def processor_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The directory of the real-vocabulary processor, built on first use.

    Args:
        cache_dir: where to keep it; ``None`` is :func:`default_cache_dir`.
    """
    out = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = out / "real-vocab-processor"
    stamp = out / _STAMP
    if not stamp.is_file() or json.loads(stamp.read_text()).get("format") != _FORMAT:
        _write(out)
    return out


def real_vocab_processor(cache_dir: str | os.PathLike[str] | None = None) -> SeamlessM4TProcessor:
    """Tokenizer with the real vocabulary size and language-tag ids + the real feature extractor.

    Raises:
        RuntimeError: if the loaded tokenizer's language tags are not at the real ids (a
            changed transformers tokenizer; delete the cache directory to rebuild).
    """
    path = processor_dir(cache_dir)
    processor = SeamlessM4TProcessor.from_pretrained(str(path))
    check_language_ids(processor.tokenizer)
    return processor


def check_language_ids(tokenizer: SeamlessM4TTokenizer) -> None:
    """Every language tag at its real id.

    Raises:
        RuntimeError: naming the first tag that is elsewhere.
    """
    for lang, want in language_ids().items():
        got = tokenizer.convert_tokens_to_ids(f"__{lang}__")
        if got != want:
            raise RuntimeError(
                f"language tag __{lang}__ must be id {want}, got {got}; delete "
                f"{str(default_cache_dir())!r} to rebuild the real-vocabulary processor"
            )
