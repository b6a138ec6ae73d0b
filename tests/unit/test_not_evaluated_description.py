"""The "not evaluated" SR's series description: short, readable, within one LO value for any model name."""

from __future__ import annotations

from worker.encode_not_evaluated import not_evaluated_description


def test_description_names_the_model_and_says_not_evaluated() -> None:
    assert not_evaluated_description("mr-brain-mindgrab") == "AI mr-brain-mindgrab not evaluated - not for diagnosis"
    assert not_evaluated_description("cxr-pneumonia", 2) == "AI cxr-pneumonia not evaluated v2 - not for diagnosis"


def test_a_long_model_name_is_shortened_never_the_words_or_the_disclaimer() -> None:
    text = not_evaluated_description("spleen-ct-segmentation-from-the-monai-model-zoo-bundle", 3)
    assert len(text) == 64
    assert text.startswith("AI spleen-ct-segmentatio") and text.endswith("... not evaluated v3 - not for diagnosis")
