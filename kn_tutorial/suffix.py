"""Running a causal LM from a middle block on the last tokens of each row, the rest taken from a cache.

Used by causal tracing (Meng et al., 2022, section 2) and by the v*/z optimisations of ROME
and MEMIT (Meng et al., 2022; 2023). All of them change one state at block `s` and token `p`
of a run and read the logits after it. Attention is causal and blocks are stacked, so
nothing at tokens before p, and nothing below block s, can change: those states are the
ones of the unchanged run. `run_from_block` runs only blocks s..L-1, only on tokens p..,
and reads the keys and values of tokens before p (at blocks >= s) from a cache of that run:

    hidden  [B, M, d]   the input of block s (its "resid_pre") at the row's suffix tokens,
                        right-padded to M (row r has suffix_len[r] real tokens)
    past    per block, (keys, values) [B, heads, P, head_dim] of the tokens before the
                        suffix, LEFT-padded: row r's past_len[r] tokens sit at P - past_len[r] .. P-1
                        (None for blocks below s, which do not run)

It swaps the model's list of blocks for blocks s.., writes `hidden` into the input of
block s (or of the final norm when s = L) with a hook, and passes explicit position ids
(past_len[r] + i) and a 4-D additive attention mask (causal within the suffix, padding
hidden). Every family in models.ARCHS indexes its key-value cache by the attention
module's own layer index and loops over its list of blocks, so this is the same
computation as the full run, up to float rounding.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from .hooks import _add_hook, _site_hook, patch
from .kv_cache import cache_keyword
from .models import _blocks, final_norm, get_arch, get_module, n_layers


@contextmanager
def only_blocks_from(model: nn.Module, start: int):
    """Inside the block, the model runs blocks start..L-1 only (its block list is swapped)."""
    blocks = _blocks(model)
    parent_path, _, attr = get_arch(model).blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if getattr(parent, attr) is not blocks:
        raise RuntimeError("the model's list of blocks is already swapped (nested only_blocks_from)")
    parent._modules[attr] = nn.ModuleList(list(blocks)[start:])
    try:
        yield
    finally:
        parent._modules[attr] = blocks


@contextmanager
def _feed(model: nn.Module, start: int, hidden: Tensor):
    """Replace the input of block `start` (the final norm when start = L) by `hidden`."""
    replace = lambda act: hidden  # noqa: E731
    if start < n_layers(model):
        with patch(model, "resid_pre", start, replace):
            yield
        return
    handle = _add_hook(final_norm(model), True, _site_hook(True, "final norm input", replace))
    try:
        yield
    finally:
        handle.remove()


def suffix_mask(past_len: Tensor, suffix_len: Tensor, P: int, M: int, dtype: torch.dtype) -> Tensor:
    """[B, 1, M, P + M] additive mask: 0 where row r's suffix token i may attend, dtype-min elsewhere."""
    device = past_len.device
    key = torch.arange(P + M, device=device)
    query = torch.arange(M, device=device)
    in_past = (key[None, :] >= P - past_len[:, None]) & (key[None, :] < P)                     # [B, P+M]
    in_suffix = (key[None, :] >= P) & (key[None, :] - P < suffix_len[:, None])                 # [B, P+M]
    causal = key[None, None, :] - P <= query[None, :, None]                                    # [1, M, P+M]
    allowed = in_past[:, None, :] | (in_suffix[:, None, :] & causal)
    allowed |= (key[None, None, :] - P == query[None, :, None])  # padded queries see themselves (no NaN)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def left_pad_past(kv: list[tuple[Tensor, Tensor] | None], lengths: Tensor) -> tuple[list, int]:
    """Keys/values of a right-padded (or unpadded) run, keeping row r's first lengths[r] tokens,
    re-laid LEFT-padded to P = max(lengths): returns (per block (keys, values) or None, P)."""
    P = int(lengths.max()) if len(lengths) else 0
    rows = torch.arange(len(lengths), device=lengths.device)[:, None]
    source = (torch.arange(P, device=lengths.device)[None, :] - (P - lengths[:, None])).clamp(min=0)  # [B, P]
    out = []
    for entry in kv:
        if entry is None:
            out.append(None)
            continue
        keys, values = entry  # [B, H, T, hd]
        out.append(tuple(x.transpose(1, 2)[rows, source].transpose(1, 2) for x in (keys, values)))
    return out, P


def run_from_block(model: nn.Module, start: int, hidden: Tensor, past: list | None, past_len: Tensor,
                   suffix_len: Tensor | None = None, last_only: bool = False,
                   read: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Logits of the suffix tokens when the model runs from block `start` (see the module docstring).

    hidden [B, M, d]: input of block `start` at the suffix; past: per block (keys, values)
    [B, H, P, hd] left-padded, None below `start` (or past=None when no row has a prefix);
    past_len [B] real prefix tokens per row; suffix_len [B] real suffix tokens (default M).
    Returns [B, M, vocab] logits, or [B, vocab] of the last position when last_only (every row
    then needs suffix_len = M). Gradients flow to `hidden`.

    read = (rows, cols), two [N] index tensors into [B, M]: only those N positions' logits are
    wanted, and [N, vocab] is returned in that order (pairs may repeat). Then the last block's
    MLP runs on those positions alone and the final norm and unembedding on them alone
    (`_read_positions`): an MLP, a norm and the unembedding each work on one position, and
    nothing after the last block mixes positions.
    """
    if read is not None:
        if last_only:
            raise ValueError("pass read=(rows, cols) or last_only=True, not both")
        return _run_reading(model, start, hidden, past, past_len, suffix_len, read)
    L = n_layers(model)
    if not 0 <= start <= L:
        raise ValueError(f"start block {start} is not in 0..{L}")
    B, M, _ = hidden.shape
    device = hidden.device
    past_len = past_len.to(device)
    suffix_len = torch.full((B,), M, device=device) if suffix_len is None else suffix_len.to(device)
    if last_only and bool((suffix_len != M).any()):
        raise ValueError("last_only needs every row's suffix to fill all M positions")
    if past is not None and len(past) != L:
        raise ValueError(f"past has {len(past)} blocks, the model {L}")
    widths = [kv[0].shape[2] for layer, kv in enumerate(past or []) if kv is not None and layer >= start]
    P = widths[0] if widths else 0  # no block runs (start = L): nothing attends
    cache = None
    if P > 0:
        cache = DynamicCache(ddp_cache_data=[(None, None) if kv is None or layer < start else kv
                                             for layer, kv in enumerate(past)])
    position_ids = past_len[:, None] + torch.arange(M, device=device)[None, :]
    mask = suffix_mask(past_len, suffix_len, P, M, hidden.dtype)
    kwargs = {} if cache is None else {cache_keyword(model): cache}
    with ExitStack() as stack:
        stack.enter_context(_feed(model, start, hidden))
        stack.enter_context(only_blocks_from(model, start))  # last: hooks above are found by layer index
        out = model(inputs_embeds=hidden.detach(), attention_mask=mask, position_ids=position_ids,
                    use_cache=cache is not None, logits_to_keep=1 if last_only else 0, **kwargs)
    return out.logits[:, -1] if last_only else out.logits


def _join_hook(new_rows: Tensor):
    """Block pre-hook appending new_rows [n, M, d] to the batch of the block's input."""

    def pre_hook(module, args, kwargs):
        if args:
            return (torch.cat([args[0], new_rows.to(args[0].dtype)]), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": torch.cat([hidden, new_rows.to(hidden.dtype)])}
    return pre_hook


def _last_block_mlp_on(model: nn.Module, width: int, cut_input, put_output, caller: str):
    """Hooks making the last block's MLP run on some positions only (a context manager's
    callbacks): cut_input(x) cuts its input [b, width, d] to those positions, and its output is
    put back there, put_output(full, out), in a [b, width, d] tensor of zeros. An MLP reads and
    writes each position alone (no mixing across positions), and after the last block only
    those positions are read, so their logits are those of the full block; the other positions
    of the last block's output are not the model's and nothing reads them."""
    mlp = get_module(model, n_layers(model) - 1, "mlp")
    batch = {}

    def cut(module, args, kwargs):
        if not args:  # every family in models.ARCHS calls its MLP with the hidden states as the one argument
            raise RuntimeError(f"{type(module).__name__} was called without a positional input; {caller} "
                               "does not know this MLP")
        batch["b"] = args[0].shape[0]
        return (cut_input(args[0]), *args[1:]), kwargs

    def widen(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        full = put_output(out.new_zeros(batch["b"], width, out.shape[-1]), out)
        return (full, *output[1:]) if isinstance(output, tuple) else full

    handles = [mlp.register_forward_pre_hook(cut, with_kwargs=True, prepend=True),
               mlp.register_forward_hook(widen, prepend=True)]  # before any hook on "mlp_out", which sees [b, width, d]
    return [handle.remove for handle in handles]


def _last_position_mlp(model: nn.Module, width: int):
    """The last block's MLP on the last position only: its input is cut to [b, 1, d] (logits_to_keep=1
    reads nothing else)."""
    def put(full: Tensor, out: Tensor) -> Tensor:
        full[:, -1:] = out
        return full

    return _last_block_mlp_on(model, width, lambda x: x[:, -1:], put,
                              "the last-position shortcut of suffix.run_rows_from_blocks")


def run_rows_from_blocks(model: nn.Module, starts: Tensor, hidden: Tensor, past: list | None, past_len: int,
                         last_only: bool = False) -> Tensor:
    """Like `run_from_block`, but row r starts at its own block starts[r], all rows in one pass.

    starts [R] ascending; hidden [R, M, d]: row r's input of block starts[r]; past: per block
    (keys, values) [R, H, P, hd] (P = past_len for every row, no padding; None for blocks below
    starts[0]), or None when past_len = 0. The model runs from block starts[0] on the rows that
    start there; a pre-hook on each later block appends the rows that start at it (rows enter
    in order, so the batch at block b is rows 0..n_b - 1, those with starts <= b, and a hook
    writing row r of a block's activation addresses it by r). Mask and positions are the same
    for every row and broadcast over the batch. Returns [R, M, vocab] (or [R, vocab] last_only).

    last_only: only the last position's logits are read, so the last block's MLP runs on the
    last position alone (`_last_position_mlp`; hooks on that MLP's "mlp_in" or "key" see one
    position, hooks on its "mlp_out" all M with zeros before the last). Its attention still
    runs on all M positions (the last one attends to them).
    """
    L = n_layers(model)
    R, M, _ = hidden.shape
    device = hidden.device
    starts = starts.to(device)
    if R == 0:
        raise ValueError("no rows to run")
    if bool((starts[1:] < starts[:-1]).any()) or not 0 <= int(starts[0]) <= int(starts[-1]) <= L:
        raise ValueError(f"starts must be ascending block indices in 0..{L}")
    first = int(starts[0])
    present = [int((starts <= b).sum()) for b in range(L + 1)]  # rows in the batch at block b
    cache = None
    if past_len > 0:
        cache = DynamicCache(ddp_cache_data=[
            (None, None) if b < first else (past[b][0][:present[b]], past[b][1][:present[b]]) for b in range(L)])
    P = past_len
    mask = suffix_mask(torch.tensor([P], device=device), torch.tensor([M], device=device), P, M, hidden.dtype)
    position_ids = P + torch.arange(M, device=device)[None, :]
    kwargs = {} if cache is None else {cache_keyword(model): cache}
    with ExitStack() as stack:
        stack.enter_context(_feed(model, first, hidden[:present[first]]))
        for b in range(first + 1, L + 1):
            if present[b] > present[b - 1]:
                module = _blocks(model)[b] if b < L else final_norm(model)
                handle = module.register_forward_pre_hook(_join_hook(hidden[present[b - 1]:present[b]]),
                                                          with_kwargs=True, prepend=True)
                stack.callback(handle.remove)
        if last_only and M > 1 and first < L:
            for remove in _last_position_mlp(model, M):
                stack.callback(remove)
        stack.enter_context(only_blocks_from(model, first))  # last: hooks above are found by layer index
        out = model(inputs_embeds=hidden[:present[first]].detach(), attention_mask=mask, position_ids=position_ids,
                    use_cache=cache is not None, logits_to_keep=1 if last_only else 0, **kwargs)
    return out.logits[:, -1] if last_only else out.logits


class _Stop(Exception):
    """Raised by the final norm's pre-hook once the positions to read are captured (_run_reading)."""


def _run_reading(model: nn.Module, start: int, hidden: Tensor, past: list | None, past_len: Tensor,
                 suffix_len: Tensor | None, read: tuple[Tensor, Tensor]) -> Tensor:
    """run_from_block(..., read=(rows, cols)): [N, vocab] logits of those positions only.

    The pairs are made unique; the last block's MLP runs on them alone (`_read_positions`), the
    model is stopped at the input of its final norm (a pre-hook captures the unique positions'
    states and raises), and the final norm and the output embedding run on those states only.
    Every family in models.ARCHS computes its logits as output_embedding(final_norm(h))."""
    rows, cols = (x.to(hidden.device).long() for x in read)
    B, M, _ = hidden.shape
    if len(rows) == 0 or len(rows) != len(cols):
        raise ValueError("read needs two index tensors of the same, non-zero length")
    if bool((rows < 0).any() | (rows >= B).any() | (cols < 0).any() | (cols >= M).any()):
        raise ValueError(f"read positions must lie in the [{B}, {M}] suffix")
    flat, back = torch.unique(rows * M + cols, return_inverse=True)
    u_rows, u_cols = flat // M, flat % M
    captured = {}

    def stop(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        captured["h"] = h[u_rows, u_cols]
        raise _Stop

    with ExitStack() as stack:
        if start < n_layers(model):
            for remove in _read_positions(model, u_rows, u_cols, M):
                stack.callback(remove)
        # appended: it runs after our hooks, so after run_from_block's own feed of the final norm when start = L
        handle = final_norm(model).register_forward_pre_hook(stop, with_kwargs=True)
        stack.callback(handle.remove)
        try:
            run_from_block(model, start, hidden, past, past_len, suffix_len)
        except _Stop:
            pass
    if "h" not in captured:
        raise RuntimeError("the final norm never ran: suffix.run_from_block(read=...) cannot read the logits")
    logits = model.get_output_embeddings()(final_norm(model)(captured["h"]))  # [unique pairs, vocab]
    return logits[back]


def _read_positions(model: nn.Module, rows: Tensor, cols: Tensor, width: int):
    """The last block's MLP on the positions (rows[i], cols[i]) only (unique pairs): its input is
    cut to [1, n, d] (only the final norm at these positions reads its output)."""
    return _last_block_mlp_on(model, width, lambda x: x[rows, cols][None],
                              lambda full, out: full.index_put((rows, cols), out[0]), "suffix.run_from_block(read=...)")
