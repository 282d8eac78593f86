"""Continual learning on the backbone registry: ConTraCon (docs/methods/contracon.md).

- reweight.py   the per-head convolutional re-weighting of attention Q/K/V weights (pure + module)
- model.py      a registry transformer (CCT or timm ViT) with per-task states (kernels, gates, norms, pool, head)
- taskid.py     entropic task identification over clean + augmented views
- data.py       task streams from labelled shards (class splits, validation carved from train)
- metrics.py    accuracy matrices, forgetting, the table, JSON and the TensorBoard picture
- train.py      the job: tasks in order, a checkpoint after each, resume at the task where it stopped
"""
