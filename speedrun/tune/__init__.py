"""``speedrun tune``: Bayesian search (Optuna) for the fastest recipe to a target, judged on a
validation split, with time-to-accuracy pruning, confirmation on fresh seeds and one test measurement.

Modules: ``space`` (what is searched), ``objective`` (the score, the penalty of a miss, the pruning
rule), ``storage`` (where studies live, dead workers), ``study`` (the three phases), ``show`` (reading
a study back), ``cli`` (the commands). Nothing here is imported by ``speedrun --help``.

>>> from speedrun.tune.study import tune  # doctest: +SKIP
>>> tune("fashion-mnist", time_budget="30m").out  # doctest: +SKIP
PosixPath('fashion-mnist-target92.toml')
"""
