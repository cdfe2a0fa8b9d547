"""Infrastructure the research stands on: `store` (append-only segment files), `cache` (the embedding cache over it,
and the encode), `files` (atomic writes, memory-mapped outputs), `ledger` (what an encode computed), `distributed`
(torchrun), `jupyter` (the checkout's kernel and JupyterLab's settings), `progress` (bars in saved runs), `errors`
(one-line user errors), `download` (the challenge data).
"""
