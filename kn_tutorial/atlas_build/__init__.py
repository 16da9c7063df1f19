"""Building and checking the Atlas model: the layer above the methods.

    train        train the tokenizer and the model from `kn_tutorial.atlas` (the data layer)
    report       recall per relation and template group
    trace_check  causal tracing averaged over many facts (`tracing`)
    rome_check   single ROME edits at a traced layer (`rome`, `evaluation`)
    probe        the measures by which Atlas variants are compared (issue 16)
    cli          `python -m kn_tutorial.atlas build-world | train | report | probe`

These modules import the methods to measure the model, so they cannot live in the data
package the methods themselves read (tests/test_layers.py).
"""
