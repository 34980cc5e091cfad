"""The offline CLIP tokenizer gives open_clip's ids, pads like SD2 and never touches the network."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE, clean_caption, clip_tokenizer

CAPTIONS = [
    "a river through farmland",
    "",
    "Aerial view: 3 storage tanks, 12.5 m/px, near the port (2019).",
    "Wow!! a stadium! next to 2 parking lots; 40% covered by cars?",
    "The image shows a dense residential area with red-roofed houses, narrow streets and a few trees.",
    "Café in São Paulo — naïve résumé, Zürich, Kraków, Reykjavík",
    "東京の空撮写真 and 北京 airport",
    "emoji 🌍🛰️ satellite",
    "it's they're we've I'm you'll he'd, IT'S LOUD",
    "tab\tand\nnewline   and    spaces",
    "  leading and trailing whitespace  ",
    "coordinates 37.6686N, 128.6581E at zoom 17 (0.6 m/px)",
    "a 500x500 image of an airport with 3 runways & 12 planes",
    "UPPER CASE CAPTION OF A HARBOUR WITH SHIPS",
    "hyphenated well-known north-south oriented fields, semi-arid",
    "<|endoftext|> inside the text, and <|startoftext|> too",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "snake_case and CamelCase and #hashtags @mentions https://example.org/a?b=c",
    " ".join(["farmland"] * 100),  # truncated to 77 with end-of-text last
    "The high-resolution image shows " + "a patchwork of green and brown agricultural fields, " * 12,
    "x" * 400,
]


@pytest.fixture(scope="module")
def tokenizer():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # building must not need the hub
        yield clip_tokenizer()


def _ids(tokenizer, caption: str) -> list[int]:
    return tokenizer(caption, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True).input_ids


@pytest.mark.parametrize("model_name", ["ViT-B-32", "ViT-H-14"])
def test_ids_identical_to_open_clip(tokenizer, model_name: str):
    import open_clip

    reference = open_clip.get_tokenizer(model_name)
    for caption in CAPTIONS:
        assert _ids(tokenizer, caption) == reference([caption])[0].tolist(), caption


def test_long_caption_truncates_to_77_with_end_of_text_last(tokenizer):
    ids = _ids(tokenizer, " ".join(["farmland"] * 100))
    assert len(ids) == CONTEXT_LENGTH
    assert ids[0] == tokenizer.bos_token_id == 49406
    assert ids[-1] == tokenizer.eos_token_id == 49407


def test_pads_like_sd2(tokenizer):
    assert tokenizer.pad_token == "!" and tokenizer.pad_token_id == 0
    assert tokenizer.model_max_length == CONTEXT_LENGTH
    assert len(tokenizer) == VOCAB_SIZE
    ids = _ids(tokenizer, "a river")
    assert ids[:4] == [49406, 320, 2473, 49407] and set(ids[4:]) == {0}
    # "!" in a caption stays text ("!</w>", id 256), as in open_clip, although it is also the pad token
    assert _ids(tokenizer, "a river!")[3] == 256


def test_clean_caption_matches_open_clip_on_messy_text(tokenizer):
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    for caption in ["the river’s bank “quoted”", "ﬁelds and ﬂoods", "ＦＵＬＬＷＩＤＴＨ", "roads &amp; rails"]:
        assert _ids(tokenizer, clean_caption(caption)) == reference([caption])[0].tolist(), caption


def test_cache_dir_and_save_pretrained_round_trip(tmp_path: Path, tokenizer):
    from transformers import CLIPTokenizer

    cached = clip_tokenizer(tmp_path / "cache")
    assert (tmp_path / "cache" / "vocab.json").is_file() and (tmp_path / "cache" / "merges.txt").is_file()
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "saved", local_files_only=True)
    for caption in CAPTIONS:
        assert _ids(reloaded, caption) == _ids(cached, caption) == _ids(tokenizer, caption)
