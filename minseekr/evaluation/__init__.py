"""What a run is measured on and how: tasks and their data, the scores, the continual-learning metrics.

    data.py       TRACE-format task folders, the named task orders (Appendix B), prompt formats
    metrics.py    EM, ROUGE-L, edit similarity, SARI; OP, BWT, BWT_T, FWT and GA over a run's matrix R
    scoring.py    a model's score on a task by greedy generation, split over ranks
    general.py    general ability (Table 2): MMLU, BoolQ, PIQA by log-likelihood; GSM8K, BBH by generation
    synthetic.py  the demo's benchmark, generated in code

Imports: `minseekr.runtime` and `minseekr.network`.
"""
