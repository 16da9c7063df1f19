"""Where is the subject? Token spans located by character offsets, never by decoding.

`subject_span("Kuwait lies on the continent of", "Kuwait")` gives the half-open range of
token positions that cover the subject's characters, using the fast tokenizer's offset
mapping. Byte-level BPE may merge the subject's first piece with a leading space
(" Kuwait"); a token counts as part of the subject when its characters overlap it.
"""
from __future__ import annotations


def find_subject(prompt: str, subject: str, occurrence: int | None = None) -> int:
    """Character index of the subject in the prompt; clear errors when absent or ambiguous."""
    if not subject or not subject.strip():
        raise ValueError("the subject must be a non-empty string")
    starts, i = [], prompt.find(subject)
    while i != -1:
        starts.append(i)
        i = prompt.find(subject, i + 1)
    if not starts:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {prompt!r}; "
                         "pass the exact string as it appears in the prompt")
    if occurrence is None:
        if len(starts) > 1:
            raise ValueError(f"subject {subject!r} occurs {len(starts)} times in {prompt!r}; "
                             "choose one with occurrence=0 (first) or occurrence=-1 (last)")
        return starts[0]
    try:
        return starts[occurrence]
    except IndexError:
        raise ValueError(f"occurrence {occurrence} asked, but {subject!r} occurs {len(starts)} "
                         f"time(s) in {prompt!r}") from None


def subject_span(tokenizer, prompt: str, subject: str, occurrence: int | None = None) -> tuple[int, int]:
    """Token positions [start, end) covering the subject in `prompt` (no special tokens added)."""
    begin = find_subject(prompt, subject, occurrence)
    end = begin + len(subject)
    offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    covered = [i for i, (a, b) in enumerate(offsets) if a < end and b > begin]
    if not covered:
        raise ValueError(f"no token of {prompt!r} covers the subject {subject!r}")
    return covered[0], covered[-1] + 1


def fill_prompt(template: str, subject: str) -> str:
    """'{} lies on the continent of' + 'Kuwait' -> 'Kuwait lies on the continent of'."""
    if "{}" not in template:
        raise ValueError(f"the prompt template {template!r} has no '{{}}' where the subject goes")
    return template.replace("{}", subject)
