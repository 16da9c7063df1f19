"""The Atlas world and its shipped model: the data layer at the bottom of the package.

    world        facts (subject, relation, object) from GeoNames -> data/world.json
    templates    the prompt templates of each relation (trained, held-out, novel)
    contexts     words before the subject: lead-ins, fillers, unrelated sentences
    corpus       the training sentences and the sequence sampler
    tokenizer    the byte-level BPE tokenizer trained on the corpus
    counterfact  Atlas-CounterFact, the editing benchmark built from the world
    data/, model/  the world file and the trained model (`models.load_model("atlas")`)

Nothing here imports a method (`rome`, `memit`, `tracing`, ...): the methods read the world,
and what trains, probes and reports on the model lives one layer up, in `kn_tutorial.atlas_build`.
The one exception is the command line, `python -m kn_tutorial.atlas` (`__main__.py`), which
forwards to `kn_tutorial.atlas_build.cli` when run. tests/test_layers.py checks this.
"""
