"""Turning many ensembles' measurements into tables and figures (scripts/report.py; reference:
reporting/README.md).

    figure7.py   reading the result files of every (dataset, method, ensemble), Figure 7 tables
    claims.py    the paper's claims on paired differences over seed sets: t-intervals, verdicts
"""
