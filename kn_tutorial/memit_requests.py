"""What a MEMIT edit is asked to do (Meng et al., 2023, "Mass-Editing Memory in a Transformer"):
the requests, their relations, the conflicts MEMIT refuses, and the key groups it edits.

A request is a (prompt template, subject, new object) with the relation it rewrites: its
`relation_id` when it has one (every CounterFact and Atlas-CounterFact case does), else its
prompt template. Two requests that give one (subject, relation) different objects contradict
each other (`find_conflicts`); `check_conflicts` raises on them. Requests that share their key
(same text up to the subject's last token) form one key group (`key_groups`): one key holds one
value, so MEMIT optimises one target for the whole group.

The method itself (targets, the joint update, the edit) is `memit`, which re-exports every name
here; this module imports nothing of MEMIT's.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .rome import prepare_request


@dataclass(frozen=True)
class Request:
    prompt: str  # template with "{}"
    subject: str
    target: str
    relation: str

    @property
    def key_text(self) -> str:  # what the key at the subject's last token can see
        return self.prompt.split("{}")[0] + self.subject


def as_request(item: dict) -> Request:
    """A CounterFact case or its `requested_rewrite` (or any ROME-style request) as a Request.

    The request carries its relation: `relation_id` when it has one (every CounterFact and
    Atlas-CounterFact case does), else its prompt template, so that two wordings of one
    relation without a `relation_id` count as two relations in `find_conflicts`."""
    rewrite = item.get("requested_rewrite", item)
    prompt, subject, target = prepare_request(rewrite)
    relation = rewrite.get("relation_id") or prompt
    return Request(prompt, subject, target, str(relation))


def find_conflicts(requests: list[Request]) -> dict[tuple[str, str], list[str]]:
    """{(subject, relation): [targets]} for every pair asked to take more than one object."""
    targets: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in requests:
        if r.target.strip() not in [t.strip() for t in targets[(r.subject, r.relation)]]:
            targets[(r.subject, r.relation)].append(r.target)
    return {pair: ts for pair, ts in targets.items() if len(ts) > 1}


def check_conflicts(requests: list[Request]) -> None:
    conflicts = find_conflicts(requests)
    if conflicts:
        shown = "; ".join(f"{s!r} / {rel!r} -> {ts}" for (s, rel), ts in list(conflicts.items())[:10])
        more = f" (and {len(conflicts) - 10} more)" if len(conflicts) > 10 else ""
        raise ValueError(f"{len(conflicts)} (subject, relation) pair(s) are asked to take different objects: "
                         f"{shown}{more}. A fact can hold one object: drop or merge these requests.")


def key_groups(requests: list[Request]) -> list[list[int]]:
    """Indices of requests that share a key (same text up to the subject's end), in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.key_text, []).append(i)
    return list(groups.values())
