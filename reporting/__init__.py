"""Turning many ensembles' measurements into tables and figures (scripts/report.py).

    figure7.py   reading the result files of every (dataset, method, ensemble), Figure 7 tables
"""
