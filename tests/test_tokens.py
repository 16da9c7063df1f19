"""Subject spans by character offsets (checked by decoding the span, an independent route)."""
import pytest

from kn_tutorial.tokens import subject_span
from tests.tiny import tiny_tokenizer


@pytest.mark.parametrize("subject", ["Osaka", "Kuwait City", "Santiago de Querétaro", "United Arab Emirates", "Lima"])
@pytest.mark.parametrize("lead", ["", "It rained. ", "Osaka lies in Japan. "])
def test_span_covers_exactly_the_subject(subject, lead):
    tok = tiny_tokenizer()
    prompt = f"{lead}{subject} lies on the continent of"
    start, end = subject_span(tok, prompt, subject, occurrence=-1)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[start:end]).strip() == subject
    assert 1 <= end - start  # multi-token subjects give several tokens
    assert tok.decode(ids[:start]).strip() == lead.strip()


def test_missing_and_repeated_subjects_are_clear_errors():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="does not occur"):
        subject_span(tok, "Osaka lies in Japan", "Kuwait")
    with pytest.raises(ValueError, match="occurs 2 times"):
        subject_span(tok, "Osaka is Osaka", "Osaka")
    assert subject_span(tok, "Osaka is Osaka", "Osaka", occurrence=0)[0] == 0
