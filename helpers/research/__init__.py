"""The research: what the workbench measures and decides, on arrays and images, with no storage or orchestration.

`data` (image sets and their preprocessing), `prompts` (+ `prompt_sets/`), `scoring` (zero-shot scores and the
probability ensemble), `stats` (intervals and paired tests), `ablation` (the dev-set ablations, from the cache),
`blur` (blur estimation and the challenge's degradation), `devset` (building a labeled dev set), `oracle` (the
winner's loop, literally: the reference the parity checks compare with).
"""
