"""The default recipe: the math of modded-nanogpt's track-1 record #89 (2026-07-17), reproduced.

One concept per module: `schedule` (stages, learning rate, momentum, windows, loss weights),
`loader` (batches of whole documents), `yarn` (rotary with window extension), `attention`
(document-causal sliding-window attention, paired heads, XSA), `dc` (dynamically composable
attention correction), `mudd` (dense connections and gates), `bigram` (hashed bigram
embedding), `mlp` (ReLU^2 MLP with FP8 forward), `loss` (logit rescale, multi-token and prefix
targets, FP8 head), `model` (the GPT), `optimizer` (NorMuon + Adam). `benchmarks/reference.py`
checks each against the record's own code.
"""
