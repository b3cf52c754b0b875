"""The benches and what they share.

``stats`` (rounds, per-round ratios, intervals, verdicts), ``records`` (the JSON
records) and ``report`` (the README tables generated from them).
"""
