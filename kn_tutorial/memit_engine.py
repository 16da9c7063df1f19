"""How MEMIT runs fast (the definition: `memit`; Meng et al., 2023, "Mass-Editing Memory in a
Transformer").

None of this changes what MEMIT computes; `memit.compute_targets_naive` is the target
optimisation run literally (a full forward pass per Adam step, δ added by a hook), and
`memit.compute_keys` / `memit.compute_residuals` read keys and residuals with whole passes. The
tests hold the engine to both.

1. Target batches. `_optimise_chunk` optimises δ for `batch_size` key groups in one batch. Adam
   treats each coordinate separately and each group's loss depends only on its own δ, so this is
   the same as optimising each group alone, its early stop included: a group that has converged
   leaves the batch, and Adam's momentum is not allowed to move its δ again.
2. Only what depends on δ. δ is added to the residual after block `layer` at the subject's last
   token, so tokens before that position and blocks up to `layer` cannot change between steps:
   one forward pass before the first step records them (the block input and a KV cache), and
   each step runs only blocks `layer` + 1 on, from the subject's last token on
   (suffix.run_from_block), computing the logits (and the last block's MLP) only where the loss
   reads them (run_from_block's `read`). The left-padded cache is re-laid only when groups leave.
   In that first pass the rows of one prefix run its tokens once (`_first_pass`).
3. Keys and residuals in one pass. `compute_keys_and_residuals` reads the key at `layer` and the
   residual after block `last` from the same rows, each cut after the subject's last token and
   stopped above block max(layer, last) (`_run_through`): attention is causal and nothing later
   is read. The rows of one prefix share its tokens, which run once (a one-row pass whose keys
   and values the rows attend to). GPT-2's GELU runs there as one kernel (models.fused_activations); in the target
   optimisation it stays the unfused module (its 1e-7 rounding, carried through the Adam steps,
   would move z; see `memit.compute_targets`).

The requests are any objects with `prompt`, `subject` and `target` (memit.Request), and the
hyper-parameters any object with MEMIT's fields (memit.MemitHparams): the engine sits below the
definition and does not import it.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .hooks import Recorder, patch
from .kv_cache import block_pairs, broadcast_cache, cache_keyword, output_cache
from .models import final_norm, fused_activations, get_block, get_device, n_layers
from .rome_engine import decay_term, kl_per_row
from .scoring import pad_rows, target_ids
from .suffix import left_pad_past, run_from_block
from .tokens import subject_span
from .validate import NonFiniteEditError, nonfinite_cause
from .weights import frozen


def _rows_at_subject(tokenizer, texts: list[str], subjects: list[str]) -> tuple[list[list[int]], list[int]]:
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    # a prefix may mention the subject too: the request's own occurrence is the last one
    last = [subject_span(tokenizer, t, s, occurrence=-1)[1] - 1 for t, s in zip(texts, subjects)]
    return rows, last


class _Enough(Exception):
    """Raised by a pre-hook once every block a read needs has run (see _run_through)."""


def _run_through(model, layer: int, **forward_kwargs) -> None:
    """model(**forward_kwargs), stopped before anything above block `layer` runs (the later blocks,
    the final norm and the unembedding read nothing that is recorded at or below `layer`)."""
    above = get_block(model, layer + 1) if layer + 1 < n_layers(model) else final_norm(model)

    def stop(module, args):
        raise _Enough

    handle = above.register_forward_pre_hook(stop)
    try:
        model(**forward_kwargs)
    except _Enough:
        pass
    finally:
        handle.remove()


def _shared_start(rows: list[list[int]], last: list[int]) -> int:
    """How many leading tokens every row shares, at most min(last) (each row keeps its read position)."""
    n = min(last)
    for row in rows[1:]:
        k, limit = 0, min(n, len(row))
        while k < limit and row[k] == rows[0][k]:
            k += 1
        n = k
    return n


@torch.no_grad()
def compute_keys_and_residuals(model, tokenizer, requests: list, groups: list[list[int]], layer: int,
                               last: int, prefixes: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(compute_keys(..., layer, prefixes), compute_residuals(..., last)) from one forward pass, the
    same numbers to float rounding; what `edit` reads before each layer's update.

    The residual's prompt is the key's prompt without prefix (prefixes[0] is ""), and nothing after
    the subject's last token nor above block `last` can change either reading (attention is causal),
    so each row runs only up to that token and through block max(layer, last). The rows of one
    prefix share its tokens: those run once, as one row whose keys and values every row of the
    prefix then attends to (a KV cache), and each row runs only its own tokens (`_shared_start`).
    GPT-2's GELU runs as one kernel (models.fused_activations)."""
    if not prefixes or prefixes[0] != "":
        raise ValueError("prefixes must start with '' (the prompt without prefix), as sample_prefixes returns")
    first = [requests[g[0]] for g in groups]
    n_prefixes = len(prefixes)
    texts = [p + r.prompt.replace("{}", r.subject) for r in first for p in prefixes]
    subjects = [r.subject for r in first for _ in prefixes]
    rows, at = _rows_at_subject(tokenizer, texts, subjects)
    device = get_device(model)
    top = max(layer, last)
    sites = [("key", layer), ("hidden", last)]
    keys = [None] * len(texts)
    hidden = [None] * len(texts)
    with fused_activations(model):
        for prefix in range(n_prefixes):  # the rows of one prefix: one per key group
            members = list(range(prefix, len(texts), n_prefixes))
            cut = [rows[i][:at[i] + 1] for i in members]
            shared = _shared_start(cut, [at[i] for i in members])
            past = None
            if shared > 0:  # the shared tokens once, their keys and values kept (blocks 0..top)
                past = DynamicCache()
                _run_through(model, top, input_ids=torch.tensor([cut[0][:shared]], device=device),
                             use_cache=True, **{cache_keyword(model): past})
                past = block_pairs(past)
            for start in range(0, len(members), batch_size):
                chunk = range(start, min(start + batch_size, len(members)))
                input_ids, mask = pad_rows([cut[j][shared:] for j in chunk], tokenizer.eos_token_id, device)
                kwargs = {}
                if past is not None:
                    n = len(chunk)
                    kwargs = {cache_keyword(model): broadcast_cache(past, n), "use_cache": True}
                    mask = torch.cat([mask.new_ones(n, shared), mask], 1)
                with Recorder(model, sites) as rec:
                    _run_through(model, top, input_ids=input_ids, attention_mask=mask, **kwargs)
                index = (torch.arange(len(chunk), device=device),
                         torch.tensor([at[members[j]] - shared for j in chunk], device=device))
                for j, key, h in zip(chunk, rec[sites[0]][index].float(), rec[sites[1]][index].float()):
                    keys[members[j]], hidden[members[j]] = key, h
    keys = torch.stack(keys).view(len(groups), n_prefixes, -1)
    return keys.mean(1), torch.stack(hidden).view(len(groups), n_prefixes, -1)[:, 0]


@torch.no_grad()
def _first_pass(model, rows: list[list[int]], partition: list[int], lookup: list[int], layer: int, width: int,
                pad_id: int, device) -> tuple[torch.Tensor, list, torch.Tensor]:
    """The pass before the first step, with each prefix's tokens run once.

    Returns, as one right-padded forward pass of all `rows` would (to float rounding): the output
    of block `layer` [R, width, d], per block the keys and values [R, H, width, hd] (None up to
    `layer`, which the steps do not run) and the logits at each row's last token [R, vocab].
    Rows of one partition (the same prefix) share their first tokens (`_shared_start`, never past
    a row's subject): those run once as one row, and the partition's rows run only their own
    tokens, attending to the shared ones' keys and values (a KV cache), which their own pass
    returns in front of theirs."""
    R, kw = len(rows), cache_keyword(model)
    hidden, kv, last_logits = None, None, None
    for part in dict.fromkeys(partition):
        idx = [i for i, q in enumerate(partition) if q == part]
        members = [rows[i] for i in idx]
        n = len(idx)
        shared = _shared_start(members, [lookup[i] for i in idx])
        kwargs, shared_hidden = {}, None
        if shared > 0:
            past = DynamicCache()
            with Recorder(model, [("hidden", layer)]) as rec:
                model(input_ids=torch.tensor([members[0][:shared]], device=device), use_cache=True, **{kw: past})
            shared_hidden = rec[("hidden", layer)].expand(n, -1, -1)
            kwargs = {kw: broadcast_cache(block_pairs(past), n)}
        input_ids, mask = pad_rows([row[shared:] for row in members], pad_id, device)
        if shared > 0:
            mask = torch.cat([mask.new_ones(n, shared), mask], 1)
        with Recorder(model, [("hidden", layer)]) as rec:
            out = model(input_ids=input_ids, attention_mask=mask, use_cache=True, **kwargs)
        h = rec[("hidden", layer)] if shared_hidden is None else torch.cat([shared_hidden, rec[("hidden", layer)]], 1)
        cache = [(keys, values) for keys, values, *_ in output_cache(out)]  # shared tokens first, then the rows'
        if hidden is None:
            hidden = h.new_zeros(R, width, h.shape[-1])
            kv = [None if b <= layer else (k.new_zeros(R, k.shape[1], width, k.shape[3]),
                                            v.new_zeros(R, v.shape[1], width, v.shape[3]))
                  for b, (k, v) in enumerate(cache)]
            last_logits = out.logits.new_zeros(R, out.logits.shape[-1])
        at = torch.tensor(idx, device=device)
        hidden[at, :h.shape[1]] = h
        for b, (k, v) in enumerate(cache):
            if b > layer:
                kv[b][0][at, :, :k.shape[2]] = k
                kv[b][1][at, :, :v.shape[2]] = v
        own_last = torch.tensor([len(row) - shared - 1 for row in members], device=device)
        last_logits[at] = out.logits[torch.arange(n, device=device), own_last]
    return hidden, kv, last_logits


def _optimise_chunk(model, tokenizer, requests, groups, layer, prefixes, hparams, naive: bool = False):
    """δ for a few key groups at once. Adam treats each coordinate separately and every group's loss
    depends only on its own δ, so this equals optimising each group alone (also its early stop).

    Each step runs only what depends on δ: the blocks after `layer`, from each row's subject's
    last token on (suffix.run_from_block); tokens before it and blocks up to `layer` come from
    one forward pass before the first step. naive=True runs every step as a full forward pass
    with δ added by a hook (the definition, kept as the oracle the fast path is tested against)."""
    device = get_device(model)
    rows, lookup, row_group, answer_rows, answer_cols, answer_tokens, answer_weight = [], [], [], [], [], [], []
    row_prefix = []  # the prefix index of each rewrite row (-1: a KL row), for the first pass
    for g, members in enumerate(groups):
        n_rows = len(members) * len(prefixes)
        for i in members:
            r = requests[i]
            tokens = target_ids(tokenizer, r.target)
            for prefix_index, p in enumerate(prefixes):
                text = p + r.prompt.replace("{}", r.subject)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                row = len(rows)
                rows.append(ids + tokens[:-1])
                row_prefix.append(prefix_index)
                lookup.append(subject_span(tokenizer, text, r.subject, occurrence=-1)[1] - 1)
                row_group.append(g)
                for j, t in enumerate(tokens):  # position len(ids)-1+j predicts token j
                    answer_rows.append(row)
                    answer_cols.append(len(ids) - 1 + j)
                    answer_tokens.append(t)
                    answer_weight.append(1.0 / (len(tokens) * n_rows))  # mean over tokens, then rows
    n_rewrite = len(rows)
    kl_group = []
    for g, members in enumerate(groups):
        subject = requests[members[0]].subject
        for k in hparams.kl_prompts:
            text = k.replace("{}", subject)
            rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
            lookup.append(subject_span(tokenizer, text, subject, occurrence=-1)[1] - 1)
            row_group.append(g)
            kl_group.append(g)
            row_prefix.append(-1)
    input_ids, mask = pad_rows(rows, tokenizer.eos_token_id, device)
    as_long = lambda x: torch.tensor(x, device=device, dtype=torch.long)  # noqa: E731
    lookup, row_group, kl_group = as_long(lookup), as_long(row_group), as_long(kl_group)
    answer_rows, answer_cols, answer_tokens = as_long(answer_rows), as_long(answer_cols), as_long(answer_tokens)
    answer_weight = torch.tensor(answer_weight, device=device)
    answer_group = row_group[answer_rows]
    kl_rows = torch.arange(n_rewrite, len(rows), device=device)
    kl_last = mask[kl_rows].sum(1) - 1
    n_groups, n_kl = len(groups), len(hparams.kl_prompts)

    if naive:
        with torch.no_grad(), Recorder(model, [("hidden", layer)]) as rec:
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        hidden, kl_logits = rec[("hidden", layer)], logits[kl_rows, kl_last]
    else:  # nothing before a row's subject's last token, nor below block layer + 1, depends on δ
        hidden, kv, last_logits = _first_pass(model, rows, row_prefix, lookup.tolist(), layer, mask.shape[1],
                                              tokenizer.eos_token_id, device)
        kl_logits = last_logits[kl_rows]  # kl_last is each KL row's last token
        all_rows = torch.arange(len(rows), device=device)
        suffix_len = mask.sum(1) - lookup
        at = (lookup[:, None] + torch.arange(int(suffix_len.max()), device=device)[None]).clamp(max=mask.shape[1] - 1)
        block_input = hidden[all_rows[:, None], at]  # [rows, width, d] the input of block layer + 1
    # h of each group: the row without prefix (prefixes[0] is "") of its first request
    first_rows = as_long([sum(len(m) for m in groups[:g]) * len(prefixes) for g in range(n_groups)])
    h = hidden[first_rows, lookup[first_rows]].float()  # [G, d_model]
    kl_before = torch.log_softmax(kl_logits.float(), -1)

    delta = torch.zeros_like(h, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    max_norm = hparams.clamp_norm_factor * h.norm(dim=1, keepdim=True)  # [G, 1]
    active = torch.ones(n_groups, dtype=torch.bool, device=device)
    steps = torch.zeros(n_groups, dtype=torch.long, device=device)
    final = {name: torch.zeros(n_groups, device=device) for name in ("nll", "loss", "kl", "decay")}
    past, past_rows = None, None  # the left-padded keys and values of the rows running, and which rows they are
    with frozen(model):
        for step in range(hparams.v_steps + 1):
            # only the rows of groups still optimising run (converged groups leave the batch)
            on = active[row_group]  # [rows]
            run = on.nonzero().squeeze(1)
            local = torch.full((len(rows),), -1, dtype=torch.long, device=device)
            local[run] = torch.arange(len(run), device=device)
            width = int(mask[run].sum(1).max())
            run_lookup, run_group = lookup[run], row_group[run]

            a, kl_on = on[answer_rows], on[kl_rows]
            read_rows = torch.cat([answer_rows[a], kl_rows[kl_on]])  # rows and columns whose logits are read
            read_cols = torch.cat([answer_cols[a], kl_last[kl_on]])
            if naive:
                def add_delta(out: torch.Tensor) -> torch.Tensor:
                    out = out.clone()
                    index = torch.arange(out.shape[0], device=out.device)
                    out[index, run_lookup] = out[index, run_lookup] + delta[run_group].to(out.dtype)
                    return out

                with patch(model, "hidden", layer, add_delta):
                    logits = model(input_ids=input_ids[run, :width], attention_mask=mask[run, :width]).logits
                read_logits = logits[local[read_rows], read_cols]
            else:
                if past_rows is None or not torch.equal(past_rows, run):  # re-laid only when groups leave
                    past, _ = left_pad_past([None if x is None else (x[0][run], x[1][run]) for x in kv], run_lookup)
                    past_rows = run
                first = block_input[run, :1] + delta[run_group, None].to(block_input.dtype)
                # only the read positions' logits are computed (the last block's MLP runs there only);
                # row r's suffix starts at its subject's last token
                read = (local[read_rows], read_cols - lookup[read_rows])
                read_logits = run_from_block(model, layer + 1, torch.cat([first, block_input[run, 1:]], 1), past,
                                             run_lookup, suffix_len[run], read=read)
            n_answers = int(a.sum())
            logprobs = torch.log_softmax(read_logits[:n_answers].float(), -1)
            token_nll = -logprobs.gather(1, answer_tokens[a, None]).squeeze(1)  # [answers]
            nll = torch.zeros(n_groups, device=device).index_add(0, answer_group[a], token_nll * answer_weight[a])
            kl_after = torch.log_softmax(read_logits[n_answers:].float(), -1)
            kl_rowwise = kl_per_row(kl_after, kl_before[kl_on], hparams.kl_direction)  # default KL(after ‖ before)
            kl = torch.zeros(n_groups, device=device).index_add(0, kl_group[kl_on], kl_rowwise) / n_kl
            decay = decay_term(hparams, delta.norm(dim=1), h.norm(dim=1))  # default ‖δ‖ / ‖h‖², as the paper's code
            loss = nll + hparams.kl_factor * kl + decay  # [G]
            if not bool(torch.isfinite(loss[active]).all()):  # a NaN loss would count as converged: δ = 0, no edit
                raise NonFiniteEditError(f"the loss of MEMIT's target optimisation at layer {layer} is not finite "
                                         f"({nonfinite_cause(model) or 'the logits overflowed'}); nothing was written")
            for name, value in (("nll", nll), ("loss", loss), ("kl", kl), ("decay", decay)):
                final[name] = torch.where(active, value.detach(), final[name])
            stop_value = loss if hparams.stop_on == "loss" else nll
            active &= stop_value.detach() >= hparams.stop_threshold  # converged groups stop where they are
            if step == hparams.v_steps or not active.any():
                break  # checked before the step; the last evaluation takes no step
            steps += active.long()
            optimizer.zero_grad()
            (loss * active).sum().backward()
            before = delta.detach().clone()
            optimizer.step()
            with torch.no_grad():
                delta.copy_(torch.where(active[:, None], delta, before))  # Adam's momentum must not move them
                norms = delta.norm(dim=1, keepdim=True)
                delta.mul_(torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms)))
    return h, h + delta.detach(), final["nll"], steps, final["loss"], final["kl"], final["decay"]
