"""The training application: configuration, training methods, the trainer, data, checkpoints,
metrics, plots, multi-process training and the ``fastcnf`` command line.

Built on ``fastcnf.cnf`` and ``fastcnf.ode``.
"""
