"""The synthetic marker task: a long-range context task on which R=1 cannot see the answer and R=2 can.

* `repro.synthetic.data`: the task (images, labels, the gap property);
* `repro.synthetic.ablation`: training and evaluating one model per (variant, seed), the CSV and its plot;
* `repro.synthetic.reach`: the attention-reach figure of a trained R=2 model;
* `python -m repro.synthetic` (`repro.synthetic.cli`): the whole ablation, then both figures;
* `python -m repro.synthetic.example`: `python -m repro.predict`'s outputs for the trained R=2 model.

The model itself lives in `models.synthetic`.
"""
