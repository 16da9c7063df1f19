"""Splitting a module must not move a name out from under its users (issue 23).

`tracing`, `memories`, `neurons`, `attribution`, `memit` and `rome` were each split into the
definition (the module itself), a fast engine (`*_engine`) and what shows results (`*_display`;
`rome` has none); `tracing` also gave its noise to `tracing_noise` and its averages over facts to
`tracing_averages`, and `models` its architecture table to `architectures` and loading to `loading`. Every name the chapters, the student notebooks, the scripts, the benchmarks,
the tests and the rest of the package take from one of these modules must still be there: this test reads those files, collects every
`from kn_tutorial.tracing import X`, `tracing.X` (after `from kn_tutorial import tracing`) and
`kn_tutorial.tracing.X`, and imports each X from its old place.
"""
from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("tracing", "memories", "neurons", "attribution", "memit", "rome")
SPLIT = METHODS + ("models",)  # models: the architecture table and loading moved out (issue 23)


def _sources():
    """(file, python source) of every file that may import from the split modules."""
    for pattern in ("book/*.ipynb", "book/exercises/*.ipynb"):
        for path in sorted(ROOT.glob(pattern)):
            cells = json.loads(path.read_text())["cells"]
            code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
            # one source per notebook: a module imported in the first cell is used in later ones
            lines = [ln[: len(ln) - len(ln.lstrip())] + "pass" if ln.lstrip().startswith(("%", "!")) else ln
                     for cell in code for ln in cell.splitlines()]  # IPython magics are not Python: `pass`
            yield path, "\n".join(lines)
    for folder in ("scripts", "tests", "benchmarks", "kn_tutorial"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.parent.name == "kn_tutorial" and path.stem.split("_")[0] in SPLIT:
                continue  # the split modules themselves
            yield path, path.read_text()


def _resolve(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against the file)."""
    if not node.level:
        return node.module or ""
    package = path.relative_to(ROOT).parent.parts
    base = list(package[: len(package) - (node.level - 1)])
    return ".".join(base + ([node.module] if node.module else []))


def used_names() -> dict[str, set[str]]:
    """{module: names taken from it} over every file of `_sources`."""
    used: dict[str, set[str]] = {m: set() for m in SPLIT}
    for path, source in _sources():
        tree = ast.parse(source, filename=str(path))
        aliases: dict[str, str] = {}  # local name -> split module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = _resolve(node, path)
                if module.startswith("kn_tutorial.") and module[len("kn_tutorial."):] in SPLIT:
                    used[module[len("kn_tutorial."):]] |= {a.name for a in node.names if a.name != "*"}
                if module == "kn_tutorial":
                    for a in node.names:
                        if a.name in SPLIT:
                            aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.Import):
                for a in node.names:
                    parts = a.name.split(".")
                    if len(parts) == 2 and parts[0] == "kn_tutorial" and parts[1] in SPLIT and a.asname:
                        aliases[a.asname] = parts[1]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in aliases:
                used[aliases[value.id]].add(node.attr)
            elif (isinstance(value, ast.Attribute) and value.attr in SPLIT
                  and isinstance(value.value, ast.Name) and value.value.id == "kn_tutorial"):
                used[value.attr].add(node.attr)
    return used


USED = used_names()

# Every public name each module defined before the split (issue 23), whether or not a file uses it.
PUBLIC_BEFORE_SPLIT = {
    "tracing": ('CMAP_OF_KIND', 'Grid', 'KINDS', 'ROLES', 'SITE_OF_KIND', 'Trace', 'average_effects',
        'noise_level', 'plot_average_effects', 'plot_trace', 'plot_traces', 'restore_states',
        'severed_effects', 'subject_noise', 'token_roles', 'trace', 'trace_batch', 'trace_explorer',
        'trace_naive', 'window_layers'),
    "models": ('ARCHS', 'ATLAS', 'ArchSpec', 'MODEL_NAME', 'MODULE_KINDS', 'atlas_model_dir', 'check_layer',
        'd_ff', 'd_model', 'default_model_name', 'embedding_matrix', 'final_norm', 'fused_activations',
        'gate_matrix', 'get_arch', 'get_block', 'get_device', 'get_module', 'key_bias', 'key_matrix',
        'load_model', 'mlp_activation', 'mlp_out_weight', 'module_name', 'n_layers', 'pick_device',
        'unembedding_matrix', 'value_bias', 'value_matrix'),
    "memories": ('AtlasSentence', 'Corpus', 'Memories', 'Trigger', 'Triggers', 'atlas_sentences',
        'atlas_token_parts', 'candidate_positions', 'ffn_as_memories', 'find_triggers',
        'key_sharing', 'key_value_agreement', 'logit_lens', 'memories_html',
        'memory_composition', 'memory_explorer', 'next_token_ranks', 'refinement',
        'same_token_resample', 'show_triggers', 'texts_from_dataset', 'token_removal_effect',
        'tokenize_corpus', 'top_memories', 'trigger_parts', 'trigger_sharing',
        'value_distribution', 'value_logits', 'value_tokens_html', 'value_top_tokens'),
    "neurons": ('AdaptedP', 'FactNeurons', 'KnEdit', 'adapt_p', 'attribute_fact', 'coarse_mask',
        'erase_relation', 'fact_prompts', 'find_knowledge_neurons', 'found_from_json',
        'found_to_json', 'kn_edit', 'layer_histogram', 'mean_ci', 'mean_count', 'most_common',
        'neuron_explorer', 'plot_effects', 'probe_prompts', 'prompt_counts', 'random_like',
        'refine', 'relation_neurons', 'request_neurons', 'request_prompts', 'scale_value_slots',
        'scaled_scores', 'shared_neurons', 'single_neuron_effects', 'split_neurons',
        'summarize_effects', 'suppress_amplify', 'zero_key_rows'),
    "attribution": ('activation_times_gradient', 'attribution_explorer', 'completeness_error',
        'integrated_gradients', 'integrated_gradients_ladder', 'integrated_gradients_naive',
        'key_activations', 'path_probabilities', 'plot_attributions', 'probability_gap',
        'riemann_alphas', 'suppressed_probabilities', 'suppressed_probability', 'top_neurons',
        'top_neurons_html'),
    "memit": ('HPARAMS_DIR', 'LayerRecord', 'MemitEdit', 'MemitHparams', 'MemitTargets', 'Request',
        'as_request', 'check_conflicts', 'compute_keys', 'compute_keys_and_residuals', 'compute_residuals',
        'compute_targets', 'compute_targets_naive', 'edit', 'find_conflicts', 'key_groups',
        'memit_explorer', 'plot_scaling', 'prediction_rows', 'prepare', 'solve_update',
        'success_with_targets'),
    "rome": ('HPARAMS_DIR', 'RomeEdit', 'RomeHparams', 'VStarResult', 'apply_rank_one', 'check_lengths',
        'check_objective', 'check_v_settings', 'compute_k_star', 'compute_v_star', 'compute_v_star_naive',
        'decay_term', 'edit', 'feasible_perturbations', 'kl_per_row', 'lstsq_update', 'prepare_request',
        'rank_one_delta', 'rank_one_update', 'read_hparams', 'sample_prefixes', 'solve_c_inverse_k'),
}


def test_the_scan_finds_the_chapters_names():
    """The scan itself works: names every chapter is known to use are found."""
    assert {"trace", "plot_traces", "average_effects"} <= USED["tracing"]
    assert {"integrated_gradients", "attribution_explorer"} <= USED["attribution"]  # a display name too
    assert {"find_triggers", "memory_explorer"} <= USED["memories"]
    assert {"kn_edit", "plot_effects"} <= USED["neurons"]
    assert {"edit", "prediction_rows", "plot_scaling", "memit_explorer"} <= USED["memit"]
    assert {"edit", "compute_v_star", "compute_v_star_naive"} <= USED["rome"]


@pytest.mark.parametrize("module", SPLIT)
def test_every_used_name_imports_from_its_old_place(module):
    mod = importlib.import_module(f"kn_tutorial.{module}")
    missing = sorted(name for name in USED[module] if not hasattr(mod, name))
    assert not missing, f"kn_tutorial.{module} no longer has {missing}: re-export them"
    for name in USED[module]:  # `from kn_tutorial.X import name` too, not only the attribute
        namespace: dict = {}
        exec(f"from kn_tutorial.{module} import {name}", namespace)
        assert namespace[name] is getattr(mod, name)


@pytest.mark.parametrize("module", SPLIT)
def test_every_public_name_of_before_the_split_is_still_there(module):
    mod = importlib.import_module(f"kn_tutorial.{module}")
    assert not [n for n in PUBLIC_BEFORE_SPLIT[module] if not hasattr(mod, n)]


def test_importing_a_method_does_not_load_its_display():
    """Display names are re-exported lazily (kn_tutorial.lazy): the import drawing stays acyclic."""
    code = ("import sys\n"
            "from kn_tutorial import attribution, memit, memories, neurons, tracing\n"
            "assert not [m for m in sys.modules if m.endswith('_display')], sys.modules.keys()\n"
            "from kn_tutorial.tracing import plot_traces\n"
            "assert plot_traces.__module__ == 'kn_tutorial.tracing_display'\n"
            "from kn_tutorial.tracing import average_effects\n"
            "assert average_effects.__module__ == 'kn_tutorial.tracing_averages'\n"
            "from kn_tutorial.memit import memit_explorer\n"
            "assert memit_explorer.__module__ == 'kn_tutorial.memit_display'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("module", METHODS)
def test_layers_engine_and_definition_do_not_import_display(module):
    """The engine and the definition never import what shows results (display imports both)."""
    for part in (module, f"{module}_engine"):
        tree = ast.parse((ROOT / "kn_tutorial" / f"{part}.py").read_text())
        imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not [m for m in imported if m.endswith("_display")], f"{part} imports a display module"
    engine = ast.parse((ROOT / "kn_tutorial" / f"{module}_engine.py").read_text())
    imported = [n.module for n in ast.walk(engine) if isinstance(n, ast.ImportFrom) and n.module]
    assert module not in imported, f"{module}_engine imports {module}: the engine sits below the definition"
