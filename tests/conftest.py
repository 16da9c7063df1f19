"""Shared test fixtures, built from the plain helpers in tests/tiny.py.

The `model` fixture runs a test once per family in FAMILIES (a tiny seeded 2-layer model);
`family`, `input_ids`, `make_tiny_model` (the builder itself) and `hub_unreachable` (the two
ways a machine can be offline) are the others. Import helpers from tests.tiny, not from here.
"""

import pytest
import torch

from tests.tiny import FAMILIES, VOCAB, tiny_model


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


@pytest.fixture
def make_tiny_model():
    return tiny_model


@pytest.fixture
def input_ids() -> torch.Tensor:
    """[batch 2, seq 5] random token ids."""
    return torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["HF_HUB_OFFLINE=1", "network down"])
def hub_unreachable(request, monkeypatch):
    """The Hugging Face hub cannot be used, in each of the two ways a machine can be offline:
    the offline flag is set, or the flag is unset and the hub does not answer."""
    from kn_tutorial import loading

    if request.param == "HF_HUB_OFFLINE=1":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    return request.param
