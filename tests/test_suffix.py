"""suffix.run_from_block: running blocks s.. on the last tokens of each row, the earlier tokens'
keys and values taken from a cache, gives the logits of the full run (every family, every s)."""
import pytest
import torch

from kn_tutorial.hooks import Recorder, count_hooks
from kn_tutorial.models import _blocks, n_layers
from kn_tutorial.suffix import left_pad_past, run_from_block


def _full_run(model, ids, lengths):
    L = n_layers(model)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()  # right padding
    with torch.no_grad(), Recorder(model, [("resid_pre", l) for l in range(L)] + [("hidden", L - 1)]) as rec:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    inputs = [rec[("resid_pre", l)] for l in range(L)] + [rec[("hidden", L - 1)]]
    return out.logits, [(k, v) for k, v, *_ in cache], inputs


@pytest.mark.parametrize("start", [0, 1, 2])
def test_suffix_run_equals_full_run(model, start):
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (3, 9))
    lengths, past_len = torch.tensor([9, 7, 8]), torch.tensor([3, 0, 5])  # ragged prefixes and suffixes
    logits, kv, inputs = _full_run(model, ids, lengths)
    past, P = left_pad_past(kv, past_len)
    assert P == 5
    M = int((lengths - past_len).max())
    at = (past_len[:, None] + torch.arange(M)[None]).clamp(max=ids.shape[1] - 1)
    hidden = inputs[start][torch.arange(3)[:, None], at]
    with torch.no_grad():
        got = run_from_block(model, start, hidden, past, past_len, lengths - past_len)
    for r in range(3):
        torch.testing.assert_close(got[r, :lengths[r] - past_len[r]], logits[r, past_len[r]:lengths[r]],
                                   atol=1e-5, rtol=1e-5)
    assert count_hooks(model) == 0 and len(_blocks(model)) == n_layers(model)  # hooks gone, blocks back


def test_suffix_run_feeds_its_input(model):
    """A changed input of block s changes the logits exactly as in the full run with that change."""
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    lengths, past_len = torch.tensor([6, 6]), torch.tensor([2, 2])
    _, kv, inputs = _full_run(model, ids, lengths)
    bump = torch.zeros_like(inputs[1])
    bump[:, 2] = torch.randn(bump.shape[-1], generator=torch.Generator().manual_seed(4))  # not constant: LN
    from kn_tutorial.hooks import patch
    with torch.no_grad(), patch(model, "resid_pre", 1, lambda x: x + bump):
        want = model(input_ids=ids).logits[:, 2:]
    past, _ = left_pad_past(kv, past_len)
    with torch.no_grad():
        got = run_from_block(model, 1, (inputs[1] + bump)[:, 2:], past, past_len)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, _full_run(model, ids, lengths)[0][:, 2:], atol=1e-3)
    with pytest.raises(ValueError, match="start block"):
        run_from_block(model, n_layers(model) + 1, inputs[0], None, past_len)


def test_rows_joining_at_their_own_blocks_equal_the_full_run(model):
    """run_rows_from_blocks: rows starting at blocks 0, 1, 1, 2 (= L: only the final norm) in one
    pass, each from its own input, give the full run's logits; an edited input changes only its row."""
    from kn_tutorial.suffix import run_rows_from_blocks
    ids = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(5))
    logits, kv, inputs = _full_run(model, ids, torch.full((4,), 7))
    starts, P = torch.tensor([0, 1, 1, 2]), 3
    hidden = torch.stack([inputs[s][r, P:] for r, s in enumerate(starts.tolist())])
    hidden[2, 0] += torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(6))
    past = [(k[:, :, :P], v[:, :, :P]) for k, v in kv]
    with torch.no_grad():
        got = run_rows_from_blocks(model, starts, hidden, past, P)
    for r in (0, 1, 3):
        torch.testing.assert_close(got[r], logits[r, P:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[2], logits[2, P:], atol=1e-3)
    assert count_hooks(model) == 0 and len(_blocks(model)) == n_layers(model)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the joining hooks are gone too
    with pytest.raises(ValueError, match="ascending"):
        run_rows_from_blocks(model, torch.tensor([1, 0, 1, 2]), hidden, past, P)


def test_rows_read_at_the_last_position_run_the_last_mlp_there_only(model):
    """run_rows_from_blocks(last_only=True) runs the last block's MLP on the last position only and
    still gives the full run's last-position logits, for rows starting at every block."""
    from kn_tutorial.models import get_module
    from kn_tutorial.suffix import run_rows_from_blocks
    L = n_layers(model)
    ids = torch.randint(0, 128, (L + 1, 7), generator=torch.Generator().manual_seed(7))
    logits, kv, inputs = _full_run(model, ids, torch.full((L + 1,), 7))
    starts, P = torch.arange(L + 1), 3  # one row per start block, the last one only the final norm
    hidden = torch.stack([inputs[s][r, P:] for r, s in enumerate(starts.tolist())])
    past = [(k[:, :, :P], v[:, :, :P]) for k, v in kv]
    widths = []
    handle = get_module(model, L - 1, "mlp").register_forward_pre_hook(lambda m, a: widths.append(a[0].shape[1]))
    try:
        with torch.no_grad():
            got = run_rows_from_blocks(model, starts, hidden, past, P, last_only=True)
    finally:
        handle.remove()
    assert widths == [1]  # M = 4 positions, the last block's MLP ran on one
    torch.testing.assert_close(got, logits[:, -1], atol=1e-5, rtol=1e-5)
    assert count_hooks(model) == 0 and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("start", [0, 1, 2])  # 2 = L: only the final norm
def test_reading_some_positions_gives_their_logits_and_gradients(model, start):
    """run_from_block(read=(rows, cols)) returns the logits of those positions of the full suffix run
    (repeated pairs included, in the order asked) and the same gradient with respect to its input;
    the last block's MLP runs on the unique pairs only."""
    from kn_tutorial.models import get_module
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (3, 9))
    lengths, past_len = torch.tensor([9, 7, 8]), torch.tensor([3, 0, 5])
    logits, kv, inputs = _full_run(model, ids, lengths)
    past, P = left_pad_past(kv, past_len)
    suffix_len = lengths - past_len
    M = int(suffix_len.max())
    at = (past_len[:, None] + torch.arange(M)[None]).clamp(max=ids.shape[1] - 1)
    hidden = inputs[start][torch.arange(3)[:, None], at]
    rows, cols = torch.tensor([2, 0, 1, 0, 2, 1]), torch.tensor([2, 5, 6, 5, 0, 1])  # (0, 5) twice
    widths = []
    handle = get_module(model, n_layers(model) - 1, "mlp").register_forward_pre_hook(
        lambda m, a: widths.append(a[0].shape[:2]))
    try:
        h1 = hidden.clone().requires_grad_(True)
        got = run_from_block(model, start, h1, past, past_len, suffix_len, read=(rows, cols))
        h2 = hidden.clone().requires_grad_(True)
        full = run_from_block(model, start, h2, past, past_len, suffix_len)
    finally:
        handle.remove()
    want = torch.stack([logits[r, past_len[r] + c] for r, c in zip(rows.tolist(), cols.tolist())])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if start < n_layers(model):
        assert widths[0] == (1, 5) and widths[1] == (3, M)  # 5 unique pairs, then the ordinary run
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    (got * weights).sum().backward()
    (full[rows, cols] * weights).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-4)
    assert count_hooks(model) == 0 and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert len(_blocks(model)) == n_layers(model)
