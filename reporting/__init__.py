"""Turning many ensembles' measurements into tables and figures (reference: reporting/README.md).

    results.py        reading the result files of every (dataset, method, ensemble), Figure 7 tables
    plots.py          every figure: Figure 7 bars, sharpness-diversity scatter, the claims figures
    claims.py         the claims' statistics: paired tests over seed sets, Holm, the trade-off slope, the control
    evidence.py       the claims' evidence: every ensemble's numbers and settings, from the runs' own records
    claims_report.py  the claims' tables and figures from the evidence files
"""
