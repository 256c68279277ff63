"""Reproductions of the papers' protocols with fastcnf's trainer (REPRODUCTION.md).

    harness.py   Arm, Budget, Protocol, ArmHooks; run_protocol (CSV per run, resumable, --jobs)
    report.py    a method's section of REPRODUCTION.md: tables (mean ± std over seeds) and plots
    cli.py       the command line every protocol shares (budget, seeds, datasets, arms, jobs)
    tpr.py       TPR (Huang & Yeh 2021): python -m bench.reproduce.tpr
    toflow.py    TO-FLOW (Du et al. 2022): python -m bench.reproduce.toflow
    jko.py       JKO-iFlow (Xu, Cheng & Xie 2023): python -m bench.reproduce.jko

A new method adds ``<method>.py`` here with ``build_protocol(args) -> Protocol``, ``REPORT`` (a
``report.MethodReport``) and ``main()`` calling ``cli.protocol_main``; e.g. ``toflow.py`` (TO-FLOW)
and ``jko.py`` (JKO-iFlow).
"""
