"""The CLIP tokenizer, built offline from the BPE vocabulary that ships inside open_clip.

No hub download is ever needed: vocab.json and merges.txt are derived from open_clip's
`bpe_simple_vocab_16e6.txt.gz` exactly as open_clip's own tokenizer derives its table, so a
`transformers.CLIPTokenizer` gives the same ids as `open_clip.get_tokenizer` (ViT-B-32, ViT-H-14) and pads
like Stable Diffusion 2 (`!`, id 0, 77 tokens).
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

CONTEXT_LENGTH = 77  # CLIP's text context, also SD2's and Text2Earth's
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"  # open_clip names them <start_of_text>/<end_of_text>; the ids are the same
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "!"  # SD2 pads with "!" (id 0) rather than CLIP's end-of-text token
_NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2  # the first 48894 merges, as open_clip's SimpleTokenizer keeps


def open_clip_bpe_path() -> Path:
    """The BPE vocabulary file inside the installed open_clip package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")  # importing open_clip would pull in torch and timm
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed: pip install open-clip-torch")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _byte_symbols() -> list[str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes stand for themselves, the others get code points from
    # 256 up, so every byte has a visible, non-whitespace symbol. Order matters for the ids: printable
    # bytes first ("!" is id 0), then the rest, as open_clip's `bytes_to_unicode` enumerates them.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    remapped = [256 + n for n in range(256 - len(printable))]
    return [chr(c) for c in printable + remapped]


def clip_vocabulary(bpe_path: Path | None = None) -> tuple[dict[str, int], list[str]]:
    """CLIP's token -> id table and its merges, from the gzipped BPE file (open_clip's by default).

    Ids: the 256 byte symbols, the same with `</w>` (end of word), one token per merge in rank order,
    then start- and end-of-text: 49408 in all.
    """
    lines = gzip.open(bpe_path or open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is the file's version header
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges), BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_path}: expected {VOCAB_SIZE} distinct CLIP tokens, built {len(vocab)}")
    return vocab, merges


def write_clip_tokenizer_files(directory: Path, bpe_path: Path | None = None) -> Path:
    """Write vocab.json and merges.txt (the files `CLIPTokenizer.from_pretrained` reads) into `directory`."""
    vocab, merges = clip_vocabulary(bpe_path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


def clip_tokenizer(cache_dir: Path | None = None) -> CLIPTokenizer:
    """A `CLIPTokenizer` with open_clip's ids and SD2's padding, built without network access.

    `cache_dir` keeps the generated files for reuse; without it they live in a temporary directory only
    while the tokenizer loads (well under a second). `split_special_tokens=True` makes "!" in a caption
    tokenize as text, as in open_clip, although "!" is also the pad token.
    """
    if cache_dir is not None:
        directory = Path(cache_dir)
        if not ((directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()):
            write_clip_tokenizer_files(directory)
        return _load(directory)
    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as tmp:
        return _load(write_clip_tokenizer_files(Path(tmp)))


def _load(directory: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(
        str(directory), local_files_only=True, model_max_length=CONTEXT_LENGTH, pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, split_special_tokens=True,
    )


def clean_caption(text: str) -> str:
    """open_clip's text cleaning (ftfy repairs, HTML entities, whitespace), which `CLIPTokenizer` lacks.

    The tokenizer already matches open_clip's NFC, whitespace and lower-casing; apply this first where
    captions may hold curly quotes, ligatures, full-width letters or HTML entities, so the ids match too.
    """
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())
